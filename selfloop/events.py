"""The event log: every observable thing a run does, one typed event per kind,
kept as JSON lines in the run directory.

Each kind is a frozen dataclass below (``Round``, ``Tournament``, ``Eval``, ...),
its ``kind`` the name it has in ``events.jsonl``. The trainer appends events
(``EventLog``); the plain reporter and the dashboard get each event as it is
written and dispatch on its type, and ``read_events`` reads a log back into
events as its resumed timeline kept it (``selfloop.observe.history`` summarizes it).
A record keeps every field as plain JSON, so the log is readable without the
code; fields added after a log was written read back as their defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from selfloop.store.rundir import RunDir

NAN = math.nan


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = ""


@dataclass(frozen=True)
class Start(Event):
    """A session began (a new population or a resume)."""

    kind: ClassVar[str] = "start"
    config: dict
    heldout: tuple[str, ...]  # the held-out tasks, described
    run_dir: str = ""
    workers: int = 0
    resumed_from: int | None = None  # the round resumed from; None: a new population
    heldout_set: str | None = None  # the held-out set's fingerprint
    unseen: tuple[str, ...] = ()  # tasks of the families left out of training


@dataclass(frozen=True)
class Resume(Event):
    kind: ClassVar[str] = "resume"
    round: int
    elapsed: float
    path: str  # the checkpoint's file name
    histories: tuple[tuple[float, ...], ...] = ()  # each member's newest held-out scores
    last_event: tuple[str, ...] = ()


@dataclass(frozen=True)
class HeldoutChanged(Event):
    """eval.* changed on resume: held-out scores start a new series."""

    kind: ClassVar[str] = "heldout_changed"
    round: int
    before: str | None
    after: str


@dataclass(frozen=True)
class TruncationsRedrawn(Event):
    """population.truncations changed on resume: members whose K is no longer
    listed drew a new one."""

    kind: ClassVar[str] = "truncations_redrawn"
    round: int
    members: tuple[int, ...]
    before: tuple[int, ...]
    after: tuple[int, ...]


@dataclass(frozen=True)
class MetaBatch(Event):
    """Tasks per member's meta-batch for this session, for its farm of
    ``workers`` (population.fill_farm); ``before``: what the resumed members
    had (0 for a new population)."""

    kind: ClassVar[str] = "meta_batch"
    round: int
    tasks: int
    workers: int
    before: int


@dataclass(frozen=True)
class Progress(Event):
    kind: ClassVar[str] = "progress"
    message: str


@dataclass(frozen=True)
class Phase(Event):
    """What the master is doing now; shown, never logged."""

    kind: ClassVar[str] = "phase"
    message: str


@dataclass(frozen=True)
class Fresh(Event):
    """A previous run was set aside and a new one started."""

    kind: ClassVar[str] = "fresh"
    message: str


@dataclass(frozen=True)
class CheckpointSkipped(Event):
    kind: ClassVar[str] = "checkpoint_skipped"
    path: str
    error: str


@dataclass(frozen=True)
class Reference(Event):
    """Adam on the held-out set."""

    kind: ClassVar[str] = "reference"
    heldout_set: str | None
    adam_best_fixed: float
    adam_tuned: float


@dataclass(frozen=True)
class Round(Event):
    """One round: every member's units run and its outer step taken."""

    kind: ClassVar[str] = "round"
    round: int
    elapsed: float
    meta_loss: tuple[float, ...]
    outer_index: tuple[int, ...]
    truncation: tuple[int, ...]
    steps: tuple[int, ...]
    age: tuple[int, ...]  # outer steps since each member's weights were last copied
    meta_loss_ema: tuple[float, ...] = ()
    outer_steps: int | None = None  # members stepped this round (older logs: None, one a member)
    rejected: int = 0
    shortened: int = 0  # by the step rail
    step_scale: tuple[float, ...] = ()
    # Median ‖Δθ‖/‖θ‖ as the outer optimizers proposed it (times population.outer_step_mult),
    # before the rail and the step scale.
    step_ratio: float | None = None
    # Each member's proposed ‖Δθ‖/‖θ‖, as ``step_ratio`` (nan: not stepped this
    # round), so the rail's use can be traced to members, ages and outer optimizers.
    step_ratios: tuple[float, ...] = ()
    # Each member's ‖ĝ‖ as its outer optimizer read it (nan: not stepped); the
    # units' estimates that reached an outer step, and how many of them
    # ``estimator.outlier_clip`` shortened.
    estimate_norms: tuple[float, ...] = ()
    estimates: int = 0
    clipped_estimates: int = 0
    replaced_tasks: int = 0
    # Per member, its slots that started a new task this round (the estimate's
    # size can jump with the task).
    replaced_by_member: tuple[int, ...] = ()
    failed_units: int = 0
    inner_steps: int = 0  # the run's total so far
    worker_restarts: int = 0
    compile_seconds: float = 0.0


@dataclass(frozen=True)
class Tournament(Event):
    """One PBT tournament (selfloop/master/pbt.py)."""

    kind: ClassVar[str] = "pbt"
    time: float
    round: int
    winner: int
    loser: int
    winner_score: float
    loser_score: float
    copied: tuple[str, ...]  # what the loser took
    outer_redrawn: bool
    outer_index: int  # the loser's outer optimizer after the event
    truncation_redrawn: bool
    truncation: int  # the loser's K after the event
    source: str = "winner"  # what the loser copied: "winner" or "champion"
    champion_score: float = NAN  # the champion's score on the same tasks (nan: none yet)
    champion_replaced: bool = False  # the winner beat the champion and became it
    # The challenge on further tasks (nan: no challenge, or confirmation off).
    confirm_winner_score: float = NAN
    confirm_champion_score: float = NAN
    confirm_t: float = NAN  # the winner's mean advantage there, in standard errors
    restore_t: float = NAN  # the champion's mean advantage over the winner on the tournament's tasks
    champion_record: float = NAN  # the champion's record: mean score minus its pairs' (> 0: worse)
    champion_retired: bool = False  # the record was worse over pbt.champion_record tournaments
    step_scale: float = 1.0  # the loser's outer step scale after the event
    # Each family's probability of this tournament's tasks (empty: uniform draws).
    allocation: tuple[float, ...] = ()
    elapsed: float = NAN  # run time (set by the trainer)


@dataclass(frozen=True)
class TournamentSkipped(Event):
    kind: ClassVar[str] = "pbt_skipped"
    round: int
    reason: str


@dataclass(frozen=True)
class Scores:
    """Mean normalized held-out loss of every member (and the champion) beside Adam's on the same tasks."""

    members: tuple[float, ...]
    best: float
    champion: float | None  # None: no champion yet, or the champion off
    adam_fixed: tuple[float, ...]  # at each of the 15 rates
    adam_best_fixed: float
    adam_tuned: float


def _scores(value: dict | None) -> Scores | None:
    return None if value is None else Scores(**{f.name: _plain(value[f.name]) for f in dataclasses.fields(Scores)})


@dataclass(frozen=True)
class Eval(Scores, Event):
    """A held-out evaluation."""

    kind: ClassVar[str] = "eval"
    round: int
    elapsed: float
    best_member: int
    members_final: tuple[float, ...]  # at the last step
    heldout_set: str | None = None
    # On the families left out of training (None: eval.unseen_families is empty).
    unseen: Scores | None = field(default=None, metadata={"decode": _scores})


@dataclass(frozen=True)
class EvalFailed(Event):
    kind: ClassVar[str] = "eval_failed"
    round: int
    error: str


@dataclass(frozen=True)
class UnitFailed(Event):
    kind: ClassVar[str] = "unit_failed"
    round: int
    member: int
    slot: int
    attempts: int
    error: str


@dataclass(frozen=True)
class Rollback(Event):
    """The divergence guard rolled a member back to its best snapshot."""

    kind: ClassVar[str] = "rollback"
    round: int
    member: int
    ema: float
    best_ema: float
    outer_index: int  # its new outer optimizer


@dataclass(frozen=True)
class Rejected(Event):
    """An outer step that would have left θ non-finite."""

    kind: ClassVar[str] = "rejected"
    round: int
    member: int
    reason: str


@dataclass(frozen=True)
class Checkpoint(Event):
    kind: ClassVar[str] = "checkpoint"
    round: int
    elapsed: float
    path: str
    seconds: float
    bytes: int


@dataclass(frozen=True)
class End(Event):
    kind: ClassVar[str] = "end"
    round: int
    elapsed: float
    reason: str
    start_best: float  # the best member's held-out loss at the series' first evaluation
    end_best: float
    adam_best_fixed: float
    adam_tuned: float


KINDS: dict[str, type[Event]] = {cls.kind: cls for cls in (
    Start, Resume, HeldoutChanged, TruncationsRedrawn, MetaBatch, Progress, Phase, Fresh, CheckpointSkipped,
    Reference, Round, Tournament, TournamentSkipped, Eval, EvalFailed, UnitFailed, Rollback, Rejected, Checkpoint,
    End,
)}  # fmt: skip


def of_type(events: list[Event], kind: type) -> list:
    """The events of one type, in order."""
    return [e for e in events if isinstance(e, kind)]


def to_record(event: Event) -> dict:
    """The event as a plain dict, its kind first."""
    return {"kind": event.kind, **dataclasses.asdict(event)}


def _plain(value: Any) -> Any:
    """JSON lists as tuples, all the way down (events are immutable)."""
    return tuple(_plain(v) for v in value) if isinstance(value, list) else value


class UnreadableRecord(ValueError):
    """A record of a known kind that lacks one of its fields."""


def from_record(record: dict) -> Event | None:
    """The event a record holds; None for a kind this version does not know.
    Keys it does not know are ignored, fields it lacks take their defaults."""
    cls = KINDS.get(record.get("kind", ""))
    if cls is None:
        return None
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in record:
            values[f.name] = f.metadata.get("decode", _plain)(record[f.name])
    try:
        return cls(**values)
    except TypeError as error:
        raise UnreadableRecord(f"a {cls.kind!r} record: {error}") from None


Report = Callable[[Event], None]


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
        self.last: Event | None = None  # the newest event
        path.parent.mkdir(parents=True, exist_ok=True)
        self.torn_bytes = cut_torn_line(path)  # reported by the trainer once the session's log is open

    def __call__(self, event: Event) -> None:
        record = {"wall_time": time.time(), **to_record(event)}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, default=_jsonable) + "\n")
        self.last = event
        self.report(event)

    def show(self, event: Event) -> None:
        """Report ``event`` without keeping it (progress within a phase)."""
        self.report(event)


def _jsonable(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")




def read_events(path: str | Path) -> list[Event]:
    """The events of a run's log (``path``: the log or its run directory) that
    its resumed timeline kept, in order (see ``surviving``). A torn or
    unreadable line is skipped with a warning; so are kinds this version does
    not know."""
    path = RunDir(Path(path)).events if Path(path).is_dir() else Path(path)
    lines = enumerate(Path(path).read_text().splitlines(), start=1)
    events = [parse_line(line, f"{path}:{number}") for number, line in lines]
    return surviving([e for e in events if e is not None])


def parse_line(line: str | bytes, where: str) -> Event | None:
    """The event one line of a log holds; None (with a warning naming ``where``)
    for a line that is not a readable record, and for kinds this version does
    not know."""
    try:
        return from_record(json.loads(line))
    except (json.JSONDecodeError, UnicodeDecodeError, UnreadableRecord, AttributeError) as error:
        print(f"{where}: skipping an unreadable line ({error})", file=sys.stderr)
        return None


def surviving(events: list[Event]) -> list[Event]:
    """Drop what a crash undid. A session killed after its last checkpoint logged
    rounds, tournaments and perhaps an evaluation that its resume repeats from
    that checkpoint; counting them too would count that stretch twice. So a
    ``Resume`` cuts the previous sessions' events back to the ``Checkpoint``
    it names (or, when that one was lost with the crash, to the rounds up to
    the one it resumed)."""
    kept: list[Event] = []
    for event in events:
        if isinstance(event, Resume):
            session = max((i for i, e in enumerate(kept) if isinstance(e, Start)), default=len(kept))
            before, current = kept[:session], kept[session:]
            named = [i for i, e in enumerate(before) if isinstance(e, Checkpoint) and e.path == event.path]
            if named:
                before = before[: named[-1] + 1]
            else:
                before = [e for e in before if getattr(e, "round", 0) <= event.round]
            kept = before + current
        kept.append(event)
    return kept
