"""Worker-process bootstrap. Imports no JAX at module level, on purpose.

Measured on jax 0.10: thread limits through XLA_FLAGS do not hold,
and pinning after JAX started has no effect. What works: set the environment,
``os.sched_setaffinity(0, {core})``, configure the persistent compilation
cache, and only then run the first JAX operation.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import queue
import signal
import sys
import threading
import traceback
from importlib import metadata
from pathlib import Path

_READY = False
_COMPILE_SECONDS = [0.0]  # this process's time in tracing, lowering and compiling (or cache loads)


def _count_compile_time(event: str, duration: float, **_kwargs) -> None:
    if event.startswith("/jax/core/compile/"):
        _COMPILE_SECONDS[0] += duration


def compile_seconds() -> float:
    """Seconds this process has spent turning Python into executables."""
    return _COMPILE_SECONDS[0]


def cpu_model() -> str:
    """The CPU model name (compiled code is only valid for matching CPU features)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compile_cache_dir(root: str | Path) -> Path:
    """``root/jaxlib-<version>-<cpu hash>``: the persistent cache is only valid
    for one jaxlib build on one CPU model, so each pair gets its own folder."""
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        version = "unknown"
    cpu = hashlib.sha256(cpu_model().encode()).hexdigest()[:10]
    return Path(root) / f"jaxlib-{version}-{cpu}"


def use_compile_cache(cache_root: str | Path) -> None:
    """Keep compiled programs in ``cache_root`` (this jaxlib and CPU's folder of it)."""
    import jax

    path = compile_cache_dir(cache_root)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # Several processes (and nodes) share the directory: keep only the
    # executable cache, whose entries are written whole.
    jax.config.update("jax_persistent_cache_enable_xla_caches", "none")


def configure_jax(cache_root: str | None) -> None:
    """Persistent compilation cache and the compile clock; call before the first JAX operation."""
    import jax

    jax.monitoring.register_event_duration_secs_listener(_count_compile_time)
    if cache_root:
        use_compile_cache(cache_root)


def prepare_process(core: int | None, cache_root: str | None, log_path: str | None) -> None:
    """Pin, redirect output and configure JAX, in that order; once per process."""
    global _READY
    if _READY:
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if core is not None:
        os.sched_setaffinity(0, {core})
    if log_path:
        # Worker output (Python, XLA's C++ logging) goes to its own file, never
        # to the master's terminal.
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    configure_jax(cache_root)
    _READY = True


def to_host(value):
    """``value`` with every JAX array, also inside dataclasses, as numpy."""
    import dataclasses

    import jax

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: to_host(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    return jax.device_get(value)


def _drain_in_background(conn) -> queue.Queue:
    """Receive the master's messages on a thread, into a queue.

    The master queues a second unit behind the running one. A unit bigger than
    the pipe's buffer (64 KiB; a hierarchical lopt's θ alone is 120 KB) would
    block the master's send until this worker read it, while this worker
    blocks sending its result to the master: a deadlock. Reading on a thread
    keeps the pipe drained. ``None`` (stop) is also queued when the master's
    end closes.
    """
    inbox: queue.Queue = queue.Queue()

    def receive() -> None:
        try:
            while (message := conn.recv()) is not None:
                inbox.put(message)
        except (EOFError, OSError):
            pass
        inbox.put(None)

    threading.Thread(target=receive, name="selfloop-inbox", daemon=True).start()
    return inbox


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel kill this process when the master dies, however it dies
    (kill -9 included), so no orphan finishes a unit nobody will read (Linux;
    elsewhere the closed pipe stops the worker after its current unit)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the master died before the request took effect
        os._exit(1)


def worker_main(core: int | None, cache_root: str | None, log_path: str | None, conn) -> None:
    """Serve one pipe: receive (task id, cloudpickled (fn, item)) or None to stop,
    answer (task id, ok, cloudpickled result or traceback, compile seconds so far)."""
    # Ctrl-C in the terminal reaches the whole process group: the master
    # finishes its round and checkpoints, so workers must not die under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    prepare_process(core, cache_root, log_path)
    import cloudpickle

    conn.send(("ready", os.getpid(), sorted(os.sched_getaffinity(0))))
    inbox = _drain_in_background(conn)
    while True:
        message = inbox.get()
        if message is None:
            return
        task_id, payload = message
        try:
            fn, item = cloudpickle.loads(payload)
            # Plain numpy on the way back: the master unpickles nothing of JAX's.
            outcome = (task_id, True, cloudpickle.dumps(to_host(fn(item))))
        except Exception:  # noqa: BLE001 - reported to the master, which decides
            outcome = (task_id, False, traceback.format_exc())
        conn.send((*outcome, compile_seconds()))
