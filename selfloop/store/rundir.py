"""A run directory: every path under it, and the lock its master holds.

    RUN_DIR/events.jsonl                 the event log (selfloop.observe.history reads it back)
    RUN_DIR/checkpoint-<round>.h5        checkpoints (selfloop.store.checkpoint)
    RUN_DIR/.checkpoint-<round>.h5.<pid>.tmp   one being written
    RUN_DIR/adam_reference_<key>.npz     Adam's curves on a held-out set, computed once
    RUN_DIR/workers/                     each worker process's own log
    RUN_DIR/lock                         held by the live master
    RUN_DIR/previous-<time>/             an earlier run, moved aside by --fresh
    RUN_DIR/eval-<label>-E<tasks>-T<steps>/   a standalone evaluation's output
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from selfloop.config import ConfigError

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d{9})\.h5$")


class RunLocked(RuntimeError):
    """Another live master holds the run directory."""


@dataclass(frozen=True)
class RunDir:
    """Names every file a run keeps under ``path``."""

    path: Path

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def lock(self) -> Path:
        return self.path / "lock"

    @property
    def workers(self) -> Path:
        return self.path / "workers"

    def checkpoint(self, round_index: int) -> Path:
        return self.path / f"checkpoint-{round_index:09d}.h5"

    def checkpoint_being_written(self, round_index: int) -> Path:
        return self.path / f".{self.checkpoint(round_index).name}.{os.getpid()}.tmp"

    def stale_checkpoints_being_written(self) -> list[Path]:
        return list(self.path.glob(".checkpoint-*.tmp"))

    def checkpoints(self) -> list[Path]:
        """Checkpoint files, newest (highest round) first."""
        if not self.path.is_dir():
            return []
        found = [p for p in self.path.iterdir() if CHECKPOINT_NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def checkpoint_rounds(self) -> list[int]:
        """The rounds of the checkpoint files, newest first."""
        return [int(CHECKPOINT_NAME.match(p.name).group(1)) for p in self.checkpoints()]

    def adam_reference(self, key: str) -> Path:
        return self.path / f"adam_reference_{key}.npz"

    def previous(self) -> Path:
        """Where ``--fresh`` moves an earlier run's files."""
        return self.path / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"

    def evaluation(self, label: str, tasks: int, steps: int) -> Path:
        return self.path / f"eval-{label}-E{tasks}-T{steps}"


def usable_run_dir(run_dir: Path) -> Path:
    """``run_dir``, created if need be; ConfigError naming run.checkpoint_dir if
    it cannot hold a run (a file, not creatable, not writable)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.checkpoint_dir: {run_dir} is a file, not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"run.checkpoint_dir: cannot create {run_dir} ({error.strerror or error})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"run.checkpoint_dir: {run_dir} is not writable")
    return run_dir



class RunLock:
    """An exclusive ``flock`` on ``run_dir/lock`` for the master's lifetime.

    The kernel drops the lock when the process dies, however it dies, so a
    stale lock file never blocks a restart; the file records who holds it so a
    refused master can name the other process.
    """

    def __init__(self, run_dir: Path):
        self.path = RunDir(run_dir).lock
        self.handle = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held open until release)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            handle.close()
            raise RunLocked(f"{self.path.parent} is in use by another master: {holder}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
