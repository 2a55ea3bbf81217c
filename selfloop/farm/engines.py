"""Executors for work units: in the master, on pinned local processes, or on Dask.

Every engine offers ``map(fn, items) -> list`` in item order, where a unit
that kept failing comes back as a ``UnitFailure`` instead of a result: it is
reported, never silently lost, and the run goes on.

``map`` takes an optional cost per item (the trainer passes each unit's
measured seconds from the round before): units go out longest first, so the
round ends on short units and no core waits long at its end (LPT scheduling).

The local engine spawns one worker per core (``spawn``: a fork after JAX
started hangs), each pinned to its own core before its first JAX operation
(``selfloop.farm.worker``). Dispatch is dynamic, so no core idles while units wait,
and each worker holds a second unit in its pipe, so it starts the next one the
moment it finishes instead of waiting for the master to pickle it.
A worker that dies (killed, out of memory) is noticed through its process
sentinel, replaced on the same core, and its unit retried up to a cap. Each
worker talks to the master over its own pipe, so one dying mid-message cannot
wedge a shared queue.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cloudpickle

from selfloop.farm.worker import compile_seconds, worker_main
from selfloop.store.rundir import RunDir


class Interrupted(Exception):
    """``map`` or ``broadcast`` gave up because its ``should_stop`` said so
    (a stop request or the time limit); units still running are abandoned."""


def never() -> bool:
    return False


Progress = Callable[[int, int], None]  # (units done, units in the call): a long phase shows it
_PENDING = object()  # LocalFarm.map's mark of a unit whose result has not come back


@contextlib.contextmanager
def reporting_progress(farm, progress: Progress):
    """``farm``'s map and broadcast call ``progress`` while this block runs."""
    farm.progress = progress
    try:
        yield
    finally:
        farm.progress = None


class FarmUnavailable(RuntimeError):
    """The engine cannot start; the message says why and what to do."""


class UnitFailure(NamedTuple):
    """A unit that failed ``attempts`` times; ``error`` is the last traceback."""

    index: int
    error: str
    attempts: int


@dataclass
class FarmStats:
    workers: int
    restarts: int = 0  # worker processes replaced after dying
    retries: int = 0  # unit attempts repeated
    failures: int = 0  # units given up on
    in_flight: int = 0
    compile_seconds: float = 0.0  # summed over the workers, replaced ones included


def dispatch_order(count: int, cost: list[float] | None) -> list[int]:
    """Item indices, most costly first (stable; item order without costs)."""
    if cost is None:
        return list(range(count))
    return sorted(range(count), key=lambda i: -cost[i])


QUEUE_DEPTH = 2  # units a local worker holds at once: the one it runs and the next


class InProcessFarm:
    """Runs units in the master, one after another (tests, tiny configs)."""

    def __init__(self, max_attempts: int = 2):
        self.max_attempts = max_attempts
        self.stats = FarmStats(workers=1)
        self.should_stop: Callable[[], bool] = never
        self.progress: Progress | None = None

    def map(self, fn: Callable, items: list, cost: list[float] | None = None) -> list:
        results = []
        for index, item in enumerate(items):  # one at a time: order cannot matter
            if self.should_stop():
                raise Interrupted
            if self.progress:
                self.progress(index, len(items))
            for attempt in range(1, self.max_attempts + 1):
                try:
                    results.append(fn(item))
                    break
                except Exception as error:  # noqa: BLE001 - retried, then reported
                    if attempt == self.max_attempts:
                        self.stats.failures += 1
                        results.append(UnitFailure(index, repr(error), attempt))
                    else:
                        self.stats.retries += 1
        self.stats.compile_seconds = compile_seconds()
        return results

    def broadcast(self, fn: Callable) -> list:
        """Run ``fn()`` once in every worker (here: once)."""
        return [fn()]

    def close(self, now: bool = False) -> None:
        pass


class _Worker:
    def __init__(self, context, slot: int, core: int | None, cache_root: str | None, log_dir: Path | None):
        self.slot, self.core = slot, core
        self.conn, child = context.Pipe(duplex=True)
        log_path = str(log_dir / f"worker-{slot}.log") if log_dir else None
        self.process = context.Process(
            target=worker_main, args=(core, cache_root, log_path, child),
            name=f"selfloop-worker-{slot}", daemon=True,
        )
        self.process.start()
        child.close()
        self.tasks: collections.deque[tuple[int, int]] = collections.deque()  # (item index, attempt), sent order
        self.affinity: list[int] | None = None
        self.compile_seconds = 0.0
        self.pid = self.process.pid


class LocalFarm:
    """A pool of spawned worker processes, each pinned to its own core."""

    def __init__(self, workers: int = 0, cache_root: str | None = None, log_dir: str | Path | None = None,
                 max_attempts: int = 3, cores: list[int] | None = None, queue_depth: int = QUEUE_DEPTH):
        self.cores = cores or sorted(os.sched_getaffinity(0))
        self.queue_depth = queue_depth
        count = workers or len(self.cores)
        self.cache_root, self.max_attempts = cache_root, max_attempts
        self.log_dir = Path(log_dir) if log_dir else None
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self._context = multiprocessing.get_context("spawn")
        self.workers = [self._spawn(slot) for slot in range(count)]
        self.stats = FarmStats(workers=count)
        self._retired_compile_seconds = 0.0
        self.should_stop: Callable[[], bool] = never  # checked about once a second while units run
        self.progress: Progress | None = None

    def _spawn(self, slot: int) -> _Worker:
        core = self.cores[slot % len(self.cores)]
        return _Worker(self._context, slot, core, self.cache_root, self.log_dir)

    def wait_ready(self, timeout: float = 120.0) -> list[list[int]]:
        """Block until every worker reported in; returns each one's CPU affinity."""
        deadline = time.monotonic() + timeout
        while any(w.affinity is None for w in self.workers):
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not start in time")
            for worker in self.workers:
                if worker.affinity is None and worker.conn.poll(0.05):
                    self._receive(worker, None, None)
        return [w.affinity for w in self.workers]

    def _receive(self, worker: _Worker, results: list | None, pending) -> None:
        message = worker.conn.recv()
        if message[0] == "ready":
            worker.affinity = message[2]
            return
        task_id, ok, payload, worker.compile_seconds = message
        self._update_compile_seconds()
        if results is None or not worker.tasks or worker.tasks[0] != task_id:
            return  # a stale answer from an attempt already given up on
        index, attempt = worker.tasks.popleft()
        if ok:
            results[index] = cloudpickle.loads(payload)
        else:
            self._retry_or_fail(index, attempt, payload, results, pending)

    def _update_compile_seconds(self) -> None:
        self.stats.compile_seconds = self._retired_compile_seconds + sum(w.compile_seconds for w in self.workers)

    def _retry_or_fail(self, index: int, attempt: int, error: str, results: list, pending) -> None:
        if attempt < self.max_attempts:
            self.stats.retries += 1
            pending.appendleft((index, attempt + 1))
        else:
            self.stats.failures += 1
            results[index] = UnitFailure(index, error, attempt)

    def _replace_dead(self, worker: _Worker, results: list, pending) -> None:
        code = worker.process.exitcode
        worker.conn.close()
        self.stats.restarts += 1
        self._retired_compile_seconds += worker.compile_seconds
        if worker.tasks:  # the unit it ran counts an attempt; the ones queued behind it were never started
            index, attempt = worker.tasks.popleft()
            pending.extendleft((i, a) for i, a in reversed(worker.tasks))
            self._retry_or_fail(index, attempt, f"worker {worker.pid} died (exit code {code})", results, pending)
        self.workers[worker.slot] = self._spawn(worker.slot)

    def broadcast(self, fn: Callable) -> list:
        """Run ``fn()`` once on every worker, all at once; returns each result."""
        payload = cloudpickle.dumps((call, fn))
        for worker in self.workers:
            worker.conn.send((("broadcast", worker.slot), payload))
        results = []
        for worker in self.workers:
            while not worker.conn.poll(0.5):
                if self.should_stop():
                    raise Interrupted
            message = worker.conn.recv()
            while message[0] == "ready":
                worker.affinity = message[2]
                message = worker.conn.recv()
            _, ok, body, worker.compile_seconds = message
            self._update_compile_seconds()
            if not ok:
                raise RuntimeError(f"worker {worker.pid} failed: {body}")
            results.append(cloudpickle.loads(body))
        return results

    def map(self, fn: Callable, items: list, cost: list[float] | None = None) -> list:
        results: list[Any] = [_PENDING] * len(items)  # not None: a unit may return None
        pending = collections.deque((i, 1) for i in dispatch_order(len(items), cost))
        done = 0
        while done < len(items):
            # Each worker gets one unit before any gets a second, so that the
            # longest units start first; then every worker keeps one queued.
            for depth in range(1, self.queue_depth + 1):
                for worker in self.workers:
                    if len(worker.tasks) < depth and pending:
                        task = pending.popleft()
                        worker.tasks.append(task)
                        try:
                            # Pickled at dispatch: the first workers start at once.
                            worker.conn.send((task, cloudpickle.dumps((fn, items[task[0]]))))
                        except (BrokenPipeError, OSError):
                            pass  # its sentinel fires below and the unit is retried
            self.stats.in_flight = sum(min(len(w.tasks), 1) for w in self.workers)
            by_handle = {}
            for worker in self.workers:
                by_handle[worker.conn] = worker
                by_handle[worker.process.sentinel] = worker
            for handle in multiprocessing.connection.wait(list(by_handle), timeout=1.0):
                worker = by_handle[handle]
                if self.workers[worker.slot] is not worker:
                    continue  # already replaced in this pass
                if handle is worker.conn:
                    try:
                        while worker.conn.poll():
                            self._receive(worker, results, pending)
                    except (EOFError, OSError):
                        pass  # dying: the sentinel handles it
                if not worker.process.is_alive():
                    self._replace_dead(worker, results, pending)
            done = sum(r is not _PENDING for r in results)
            if done < len(items) and self.should_stop():
                raise Interrupted
            if self.progress:
                self.progress(done, len(items))
        self.stats.in_flight = 0
        return results

    def close(self, now: bool = False) -> None:
        """Stop the workers: after their current unit, or ``now`` (abandoning it)."""
        for worker in self.workers:
            try:
                if now:
                    worker.process.terminate()
                else:
                    worker.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for worker in self.workers:
            worker.process.join(timeout=1 if now else 5)
            if worker.process.is_alive():
                worker.process.kill() if now else worker.process.terminate()


def call(fn: Callable) -> Any:
    return fn()


def make_farm(config, run_dir: Path):
    """The engine ``config`` (a ``FarmConfig``) names, started and ready."""
    cache = config.compile_cache or None
    if config.engine == "inprocess":
        return InProcessFarm(config.max_attempts)
    if config.engine == "dask":
        from selfloop.farm.cluster import DaskFarm

        return DaskFarm(config.scheduler, cache, config.max_attempts, config.connect_seconds)
    farm = LocalFarm(usable_workers(config.workers)[0], cache, RunDir(run_dir).workers, config.max_attempts)
    farm.wait_ready()
    return farm


# A worker's resident memory once it has compiled the default config's programs
# for every task family (measured: about 1.7 GB), with some headroom.
WORKER_MEMORY_BYTES = 2 * 1024**3


def available_memory() -> int | None:
    """Bytes of memory available for new processes (Linux), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def usable_workers(requested: int, memory: int | None = None) -> tuple[int, str]:
    """Local workers for ``farm.workers`` and, when fewer than asked, why: 0
    means one per available core; never more than the cores (a worker is
    pinned to a core; two on one core only share it) nor than the available
    memory holds at ``WORKER_MEMORY_BYTES`` each."""
    cores = len(os.sched_getaffinity(0))
    count = cores if requested == 0 else min(requested, cores)
    reason = f"capped to the {cores} cores available" if count < requested else ""
    memory = available_memory() if memory is None else memory
    if memory is not None and count * WORKER_MEMORY_BYTES > memory:
        count = max(1, memory // WORKER_MEMORY_BYTES)
        reason = (f"capped to {count}: {memory / 1024**3:.1f} GB of memory available, about "
                  f"{WORKER_MEMORY_BYTES / 1024**3:.0f} GB per worker")
    return count, reason
