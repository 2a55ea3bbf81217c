"""The event log: every observable thing a run does, as JSON lines in the run directory.

The trainer appends one record per round, tournament, evaluation, checkpoint
and session boundary (``EventLog``); the plain reporter and the dashboard get
each record as it is written, and ``read_events`` reads a log back as its
resumed timeline kept it (``selfloop.history`` summarizes it).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from selfloop.store.rundir import RunDir

Report = Callable[[dict], None]


def cut_torn_line(path: Path) -> int:
    """Cut a last line that a crash left half-written (no newline), so the next
    record starts on a line of its own; returns the bytes cut."""
    if not path.exists():
        return 0
    with path.open("rb+") as handle:
        size = handle.seek(0, 2)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            block = handle.read(end - start)
            if end == size and block.endswith(b"\n"):
                return 0
            newline = block.rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        handle.truncate(end)
        return size - end


class EventLog:
    """Append-only JSON lines next to the checkpoints, readable without the code."""

    def __init__(self, path: Path, report: Report):
        self.path, self.report = path, report
        self.last: dict = {"kind": "none"}  # the newest record
        path.parent.mkdir(parents=True, exist_ok=True)
        self.torn_bytes = cut_torn_line(path)  # reported by the trainer once the session's log is open

    def __call__(self, record: dict) -> None:
        record = {"wall_time": time.time(), **record}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, default=_jsonable) + "\n")
        self.last = record
        self.report(record)

    def show(self, record: dict) -> None:
        """Report ``record`` without keeping it (progress within a phase)."""
        self.report({"wall_time": time.time(), **record})


def _jsonable(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")




def read_events(path: str | Path) -> list[dict]:
    """The records of a run's event log (``path``: the log or its run directory)
    that its resumed timeline kept, in order (a torn last line is skipped; see
    ``surviving``)."""
    path = RunDir(Path(path)).events if Path(path).is_dir() else Path(path)
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path}:{number}: skipping an unreadable line", file=sys.stderr)
    return surviving(records)


def surviving(records: list[dict]) -> list[dict]:
    """Drop what a crash undid. A session killed after its last checkpoint logged
    rounds, tournaments and perhaps an evaluation that its resume repeats from
    that checkpoint; counting them too would count that stretch twice. So a
    ``resume`` record cuts the previous sessions' records back to the
    ``checkpoint`` record it names (or, when that record was lost with the
    crash, to the rounds up to the one it resumed)."""
    kept: list[dict] = []
    for record in records:
        if record["kind"] == "resume":
            session = max((i for i, r in enumerate(kept) if r["kind"] == "start"), default=len(kept))
            before, current = kept[:session], kept[session:]
            named = [i for i, r in enumerate(before) if r["kind"] == "checkpoint" and r.get("path") == record["path"]]
            if named:
                before = before[: named[-1] + 1]
            else:
                before = [r for r in before if r.get("round", 0) <= record["round"]]
            kept = before + current
        kept.append(record)
    return kept
