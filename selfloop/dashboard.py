"""Live terminal dashboard (rich): per-member losses, who trains whom, PBT events, throughput.

The master's event records (the same dicts that go to ``events.jsonl``) are
folded into a ``DashboardState`` by ``apply``; ``render`` turns a state into a
rich renderable and nothing else, so it is tested at a fixed width without a
terminal. ``LiveDashboard`` ties them together: records are folded in the
master's thread under a lock, and rich's refresh thread renders a copy a few
times a second, so the run never waits for the screen.
"""

from __future__ import annotations

import collections
import copy
import math
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from selfloop.report import format_record

SPARK = "▁▂▃▄▅▆▇█"
TREND_POINTS = 24
EVENTS_SHOWN = 8
RATE_WINDOW = 20  # round records over which throughput is measured


@dataclass
class MemberRow:
    evals: list[float] = field(default_factory=list)  # held-out normalized loss, oldest first
    meta_loss: float = math.nan
    outer_index: int = -1
    truncation: int = 0
    steps: int = 0
    age: int = 0  # outer steps since this lineage's weights were last copied (or since init)
    last_event: str = "init"

    @property
    def latest(self) -> float:
        return self.evals[-1] if self.evals else math.nan

    @property
    def best(self) -> float:
        finite = [x for x in self.evals if math.isfinite(x)]
        return min(finite) if finite else math.nan


@dataclass
class DashboardState:
    """What the dashboard shows, folded from event records."""

    run_name: str = ""
    run_dir: str = ""
    resumed_from: int | None = None
    workers: int = 0
    pbt_interval: tuple[float, int] = (0.0, 0)  # (seconds, rounds)
    checkpoint_interval: tuple[float, int] = (0.0, 0)
    members: list[MemberRow] = field(default_factory=list)
    events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=EVENTS_SHOWN))
    round: int = 0
    elapsed: float = 0.0  # run time at the newest record
    received: float = 0.0  # wall time the newest timed record arrived
    inner_steps: int = 0
    rate_samples: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RATE_WINDOW))
    worker_restarts: int = 0
    failed_units: int = 0
    rollbacks: int = 0
    last_pbt: tuple[float, int] = (0.0, 0)  # (run time, round)
    last_checkpoint: tuple[float, int] = (0.0, 0)
    best: float = math.nan
    best_member: int = -1
    adam_best_fixed: float = math.nan
    adam_tuned: float = math.nan
    champion: float = math.nan  # the PBT champion's held-out loss (it is scored beside the members)
    unseen: dict | None = None  # the newest scores on families left out of training (eval.unseen_families)
    status: str = "starting"

    def ensure_members(self, count: int) -> None:
        while len(self.members) < count:
            self.members.append(MemberRow())


def apply(state: DashboardState, record: dict, now: float | None = None) -> None:
    """Fold one event record into ``state``."""
    kind = record["kind"]
    now = time.time() if now is None else now
    if "elapsed" in record and kind != "resume":
        state.elapsed, state.received = record["elapsed"], now
    if kind == "start":
        config = record["config"]
        state.run_name, state.run_dir = config["run"]["name"], record.get("run_dir", config["run"]["checkpoint_dir"])
        state.resumed_from, state.workers = record.get("resumed_from"), record.get("workers", 0)
        state.pbt_interval = (config["pbt"]["interval_seconds"], config["pbt"]["interval_rounds"])
        state.checkpoint_interval = (config["checkpoint"]["interval_seconds"], config["checkpoint"]["interval_rounds"])
        state.ensure_members(config["population"]["size"])
        state.status = "compiling and computing the Adam reference"
    elif kind == "resume":
        state.round, state.elapsed, state.received = record["round"], record["elapsed"], now
        state.last_checkpoint = state.last_pbt = (record["elapsed"], record["round"])
        state.ensure_members(len(record["histories"]))
        for row, history, event in zip(state.members, record["histories"], record["last_event"]):
            row.evals, row.last_event = list(history), event
    elif kind == "round":
        state.round, state.inner_steps, state.status = record["round"], record["inner_steps"], "training"
        state.worker_restarts, state.failed_units = record["worker_restarts"], state.failed_units + record[
            "failed_units"]
        state.rate_samples.append((record["elapsed"], record["inner_steps"]))
        state.ensure_members(len(record["meta_loss"]))
        for i, row in enumerate(state.members):
            row.meta_loss, row.outer_index = record["meta_loss"][i], record["outer_index"][i]
            row.truncation, row.steps, row.age = record["truncation"][i], record["steps"][i], record["age"][i]
    elif kind == "eval":
        state.ensure_members(len(record["members"]))
        for row, score in zip(state.members, record["members"]):
            row.evals.append(float(score))
        state.best, state.best_member = record["best"], record["best_member"]
        state.champion = math.nan if record.get("champion") is None else record["champion"]
        state.adam_best_fixed, state.adam_tuned = record["adam_best_fixed"], record["adam_tuned"]
        state.unseen = record.get("unseen")
    elif kind == "pbt":
        state.last_pbt = (record.get("elapsed", state.elapsed), record["round"])
        state.ensure_members(max(record["winner"], record["loser"]) + 1)
        loser = state.members[record["loser"]]
        loser.age = 0
        source = "champion" if record.get("source") == "champion" else f"m{record['winner']}"
        loser.last_event = f"copied {source} @r{record['round']}"
    elif kind == "pbt_skipped":
        state.last_pbt = (state.elapsed, record["round"])
    elif kind == "rollback":
        state.rollbacks += 1
        state.ensure_members(record["member"] + 1)
        state.members[record["member"]].last_event = f"rollback @r{record['round']}"
    elif kind == "checkpoint":
        state.last_checkpoint = (record["elapsed"], record["round"])
    elif kind == "progress":
        state.status = record["message"]
    elif kind == "end":
        state.status = f"finished ({record.get('reason', 'budget')})"
    if kind in ("pbt", "pbt_skipped", "rollback", "rejected", "unit_failed", "checkpoint_skipped", "eval_failed"):
        line = format_record(record)
        if line is not None:
            state.events.append(line)


def sparkline(values: list[float], width: int = TREND_POINTS) -> str:
    values = [v for v in values[-width:] if math.isfinite(v)]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    return "".join(SPARK[0 if span == 0 else min(len(SPARK) - 1, int((v - low) / span * len(SPARK)))] for v in values)


def _number(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"


def _count(value: float) -> str:
    return f"{value:,.0f}" if math.isfinite(value) else "-"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _time_to_next(interval: tuple[float, int], last: tuple[float, int], elapsed: float, round_index: int) -> str:
    seconds, rounds = interval
    parts = []
    if seconds > 0:
        parts.append(_duration(seconds - (elapsed - last[0])))
    if rounds > 0:
        parts.append(f"{max(0, rounds - (round_index - last[1]))} rounds")
    return " or ".join(parts) or "-"


def _throughput(state: DashboardState) -> float:
    if len(state.rate_samples) < 2:
        return math.nan
    (t0, s0), (t1, s1) = state.rate_samples[0], state.rate_samples[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 else math.nan


def member_table(state: DashboardState) -> Table:
    table = Table(expand=True, pad_edge=False, box=None, header_style="bold")
    for name, justify in (("member", "left"), ("latest", "right"), ("best", "right"), ("trend", "left"),
                          ("meta-loss", "right"), ("trained by", "right"), ("K", "right"), ("age", "right"),
                          ("steps", "right"), ("last event", "left")):
        table.add_column(name, justify=justify, no_wrap=True)
    for i, row in enumerate(state.members):
        style = "bold green" if i == state.best_member else ""
        table.add_row(
            f"m{i}", _number(row.latest), _number(row.best), sparkline(row.evals), _number(row.meta_loss),
            f"m{row.outer_index}" if row.outer_index >= 0 else "-", str(row.truncation or "-"), f"{row.age:,}",
            f"{row.steps:,}", row.last_event, style=style,
        )  # fmt: skip
    return table


def render(state: DashboardState, in_flight: int = 0, now: float | None = None) -> Group:
    """The whole screen for ``state``; ``now`` (wall time) advances the clocks between records."""
    now = time.time() if now is None else now
    elapsed = state.elapsed + (max(0.0, now - state.received) if state.received else 0.0)
    resumed = "new population" if state.resumed_from is None else f"resumed from round {state.resumed_from}"
    header = Text.assemble(
        (f"selfloop · {state.run_name}", "bold"), f"   {state.run_dir}   {resumed}   ",
        (f"round {state.round:,}", "bold"), f"   run time {_duration(elapsed)}   {state.status}",
    )  # fmt: skip
    rate = _throughput(state)
    workers = max(state.workers, 1)
    versus = "-"
    if math.isfinite(state.best) and math.isfinite(state.adam_best_fixed):
        verdict = "beats" if state.best < state.adam_best_fixed else "behind"
        versus = (f"m{state.best_member} {state.best:.3f} vs Adam best fixed lr {state.adam_best_fixed:.3f} "
                  f"({verdict}); per-task tuned {_number(state.adam_tuned)}; PBT champion {_number(state.champion)}")
    next_pbt = _time_to_next(state.pbt_interval, state.last_pbt, elapsed, state.round)
    next_checkpoint = _time_to_next(state.checkpoint_interval, state.last_checkpoint, elapsed, state.round)
    health = Text("\n".join((
        f"inner steps/s {_count(rate)} ({_count(rate / workers)} per core, {state.workers} workers)   "
        f"units in flight {in_flight}   worker restarts {state.worker_restarts}   failed units {state.failed_units}",
        f"next PBT in {next_pbt}   next checkpoint in {next_checkpoint}   rollbacks {state.rollbacks}   "
        f"inner steps {state.inner_steps:,}",
        f"held-out best: {versus}",
        *([f"unseen families: best {state.unseen['best']:.3f} vs Adam best fixed lr "
           f"{state.unseen['adam_best_fixed']:.3f}; per-task tuned {state.unseen['adam_tuned']:.3f}"]
          if state.unseen else []),
    )), no_wrap=True, overflow="ellipsis")  # fmt: skip
    events = Text("\n".join(state.events) if state.events else "no PBT events yet", no_wrap=True, overflow="ellipsis")
    return Group(
        Panel(header, padding=(0, 1)),
        Panel(member_table(state), title="members (held-out mean normalized loss; lower is better)"),
        Panel(events, title="recent PBT events, rollbacks and rejected steps", height=EVENTS_SHOWN + 2),
        Panel(health, title="throughput and health"),
    )


class LiveDashboard:
    """A reporter (``dashboard(record)``) that shows a rich ``Live`` screen while open."""

    def __init__(self, in_flight=lambda: 0, console: Console | None = None, refresh_per_second: float = 4.0):
        self.state = DashboardState()
        self.lock = threading.Lock()
        self.in_flight = in_flight
        # Prints from the master (warnings) are shown above the screen, not through it.
        self.live = Live(console=console, get_renderable=self._snapshot, refresh_per_second=refresh_per_second)

    def __call__(self, record: dict) -> None:
        with self.lock:
            apply(self.state, record)

    def _snapshot(self) -> Group:
        with self.lock:
            state = copy.deepcopy(self.state)
        return render(state, self.in_flight())

    def __enter__(self) -> LiveDashboard:
        self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        self.live.stop()
