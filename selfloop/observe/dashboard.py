"""Live terminal dashboard (rich): per-member losses, who trains whom, PBT events, throughput.

The master's typed events (``selfloop.events``, the same ones that go to
``events.jsonl``) are folded into a ``DashboardState`` by ``apply``; ``render``
turns a state into a rich renderable and nothing else, so it is tested at a
fixed width without a terminal. ``LiveDashboard`` ties them together: events are folded in the
master's thread under a lock, and rich's refresh thread renders a copy a few
times a second, so the run never waits for the screen.
"""

from __future__ import annotations

import collections
import copy
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from selfloop import events as ev
from selfloop.observe.plain import format_event

SPARK = "▁▂▃▄▅▆▇█"
TREND_POINTS = 24
EVENTS_SHOWN = 8
RATE_WINDOW = 20  # rounds over which throughput is measured


@dataclass
class MemberRow:
    evals: list[float] = field(default_factory=list)  # held-out normalized loss, oldest first
    meta_loss: float = math.nan
    outer_index: int = -1
    truncation: int = 0
    steps: int = 0
    age: int = 0  # outer steps since this lineage's weights were last copied (or since init)
    last_event: str = "init"
    replaced: bool = False  # its weights were copied over or rolled back since its last evaluation

    @property
    def latest(self) -> float:
        return self.evals[-1] if self.evals else math.nan

    @property
    def best(self) -> float:
        finite = [x for x in self.evals if math.isfinite(x)]
        return min(finite) if finite else math.nan


@dataclass
class DashboardState:
    """What the dashboard shows, folded from events."""

    run_name: str = ""
    run_dir: str = ""
    resumed_from: int | None = None
    workers: int = 0
    pbt_interval: tuple[float, int] = (0.0, 0)  # (seconds, rounds)
    checkpoint_interval: tuple[float, int] = (0.0, 0)
    members: list[MemberRow] = field(default_factory=list)
    events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=EVENTS_SHOWN))
    round: int = 0
    elapsed: float = 0.0  # run time at the newest timed event
    received: float = 0.0  # wall time the newest timed event arrived
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
    unseen: ev.Scores | None = None  # the newest scores on families left out of training (eval.unseen_families)
    pbt_events: int = 0
    status: str = "starting"

    def ensure_members(self, count: int) -> None:
        while len(self.members) < count:
            self.members.append(MemberRow())


def _on_start(state: DashboardState, event: ev.Start) -> None:
    config = event.config
    state.run_name, state.run_dir = config["run"]["name"], event.run_dir or config["run"]["checkpoint_dir"]
    state.resumed_from, state.workers = event.resumed_from, event.workers
    state.pbt_interval = (config["pbt"]["interval_seconds"], config["pbt"]["interval_rounds"])
    state.checkpoint_interval = (config["checkpoint"]["interval_seconds"], config["checkpoint"]["interval_rounds"])
    state.ensure_members(config["population"]["size"])
    state.status = "starting: compiling, then the Adam reference"


def _on_resume(state: DashboardState, event: ev.Resume) -> None:
    # The run clock stands still until training resumes (preparation is not run time).
    state.round, state.elapsed, state.received = event.round, event.elapsed, 0.0
    state.last_checkpoint = state.last_pbt = (event.elapsed, event.round)
    state.ensure_members(len(event.histories))
    for row, history, last_event in zip(state.members, event.histories, event.last_event):
        row.evals, row.last_event = list(history), last_event
    latest = [row.latest for row in state.members]
    if any(math.isfinite(x) for x in latest):
        state.best_member = min(range(len(latest)), key=lambda i: latest[i] if math.isfinite(latest[i]) else 9e9)
        state.best = latest[state.best_member]


def _on_reference(state: DashboardState, event: ev.Reference) -> None:
    state.adam_best_fixed, state.adam_tuned = event.adam_best_fixed, event.adam_tuned


def _on_heldout_changed(state: DashboardState, event: ev.HeldoutChanged) -> None:
    for row in state.members:
        row.evals = []
    state.best, state.best_member, state.champion = math.nan, -1, math.nan


def _on_round(state: DashboardState, event: ev.Round) -> None:
    state.round, state.inner_steps, state.status = event.round, event.inner_steps, "training"
    state.worker_restarts = event.worker_restarts
    state.failed_units += event.failed_units
    state.rate_samples.append((event.elapsed, event.inner_steps))
    state.ensure_members(len(event.meta_loss))
    for i, row in enumerate(state.members):
        row.meta_loss, row.outer_index = event.meta_loss[i], event.outer_index[i]
        row.truncation, row.steps, row.age = event.truncation[i], event.steps[i], event.age[i]


def _on_eval(state: DashboardState, event: ev.Eval) -> None:
    state.ensure_members(len(event.members))
    for row, score in zip(state.members, event.members):
        row.evals.append(float(score))
        row.replaced = False
    state.best, state.best_member = event.best, event.best_member
    state.champion = math.nan if event.champion is None else event.champion
    state.adam_best_fixed, state.adam_tuned = event.adam_best_fixed, event.adam_tuned
    state.unseen = event.unseen


def _on_tournament(state: DashboardState, event: ev.Tournament) -> None:
    state.last_pbt = (state.elapsed if math.isnan(event.elapsed) else event.elapsed, event.round)
    state.ensure_members(max(event.winner, event.loser) + 1)
    loser = state.members[event.loser]
    loser.age, loser.replaced = 0, True
    source = "champion" if event.source == "champion" else f"m{event.winner}"
    loser.last_event = f"copied {source} @r{event.round}"
    state.pbt_events += 1


def _on_rollback(state: DashboardState, event: ev.Rollback) -> None:
    state.rollbacks += 1
    state.ensure_members(event.member + 1)
    state.members[event.member].last_event = f"rollback @r{event.round}"
    state.members[event.member].replaced = True


def _on_checkpoint(state: DashboardState, event: ev.Checkpoint) -> None:
    state.last_checkpoint = (event.elapsed, event.round)
    if state.status.startswith("writing"):
        state.status = "training"


def _on_status(state: DashboardState, event: ev.Progress | ev.Phase) -> None:
    state.status = event.message


# What each type of event changes on the screen; other types change nothing.
HANDLERS: dict[type[ev.Event], Callable] = {
    ev.Start: _on_start,
    ev.Resume: _on_resume,
    ev.Reference: _on_reference,
    ev.HeldoutChanged: _on_heldout_changed,
    ev.Round: _on_round,
    ev.Eval: _on_eval,
    ev.Tournament: _on_tournament,
    ev.TournamentSkipped: lambda state, event: setattr(state, "last_pbt", (state.elapsed, event.round)),
    ev.Rollback: _on_rollback,
    ev.Checkpoint: _on_checkpoint,
    ev.Progress: _on_status,
    ev.Phase: _on_status,
    ev.End: lambda state, event: setattr(state, "status", f"finished ({event.reason or 'budget'})"),
}
# Types also listed, as their log line, in the events panel.
LISTED = (ev.Tournament, ev.TournamentSkipped, ev.Rollback, ev.Rejected, ev.UnitFailed, ev.CheckpointSkipped,
          ev.EvalFailed, ev.TruncationsRedrawn, ev.MetaBatch)
# Types whose run time is not the clock's now: a resume's is the checkpoint's, an end's the session's.
UNTIMED = (ev.Resume, ev.End)


def apply(state: DashboardState, event: ev.Event, now: float | None = None) -> None:
    """Fold one event into ``state``."""
    now = time.time() if now is None else now
    elapsed = getattr(event, "elapsed", math.nan)
    if not isinstance(event, UNTIMED) and not math.isnan(elapsed):
        state.elapsed, state.received = elapsed, now
    handler = HANDLERS.get(type(event))
    if handler is not None:
        handler(state, event)
    if isinstance(event, LISTED):
        line = format_event(event)
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
    if 0 < seconds < 10:  # a countdown would read 0:00 throughout
        parts.append(f"every {seconds:g} s")
    elif seconds > 0:
        parts.append(_duration(seconds - (elapsed - last[0])))
    if rounds > 0:
        parts.append(f"{max(0, rounds - (round_index - last[1]))} rounds")
    return " or ".join(parts) or "-"


def _throughput(state: DashboardState) -> float:
    if len(state.rate_samples) < 2:
        return math.nan
    (t0, s0), (t1, s1) = state.rate_samples[0], state.rate_samples[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 else math.nan


WIDE = 110  # narrower terminals get the member table without trend, age and steps
COLUMNS = (("member", "left"), ("latest", "right"), ("best", "right"), ("trend", "left"), ("meta-loss", "right"),
           ("trained by", "right"), ("K", "right"), ("age", "right"), ("steps", "right"), ("last event", "left"))
NARROW_DROPS = ("trend", "age", "steps")


def member_table(state: DashboardState, width: int = WIDE) -> Table:
    """One row per member; a latest score marked * belongs to weights that have
    since been replaced (a PBT copy or a rollback): it is not theirs."""
    columns = [c for c in COLUMNS if width >= WIDE or c[0] not in NARROW_DROPS]
    table = Table(expand=True, pad_edge=False, box=None, header_style="bold")
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True, overflow="ellipsis")
    for i, row in enumerate(state.members):
        cells = {
            "member": f"m{i}", "latest": _number(row.latest) + ("*" if row.replaced else ""),
            "best": _number(row.best), "trend": sparkline(row.evals), "meta-loss": _number(row.meta_loss),
            "trained by": f"m{row.outer_index}" if row.outer_index >= 0 else "-", "K": str(row.truncation or "-"),
            "age": f"{row.age:,}", "steps": f"{row.steps:,}", "last event": row.last_event,
        }  # fmt: skip
        table.add_row(*(cells[name] for name, _ in columns), style="bold green" if i == state.best_member else "")
    return table


def _health_lines(state: DashboardState, in_flight: int, elapsed: float) -> list[str]:
    """The progress-and-health panel: held-out scores against Adam, throughput, cadences."""
    rate = _throughput(state)
    workers = max(state.workers, 1)
    versus = "-"
    if math.isfinite(state.best) and math.isfinite(state.adam_best_fixed):
        verdict = "beats" if state.best < state.adam_best_fixed else "behind"
        versus = (f"m{state.best_member} {state.best:.3f} vs Adam best fixed lr {state.adam_best_fixed:.3f} "
                  f"({verdict}); per-task tuned {_number(state.adam_tuned)}; PBT champion {_number(state.champion)}")
    next_pbt = _time_to_next(state.pbt_interval, state.last_pbt, elapsed, state.round)
    next_checkpoint = _time_to_next(state.checkpoint_interval, state.last_checkpoint, elapsed, state.round)
    return [
        f"held-out best: {versus}",
        *([f"unseen families: best {state.unseen.best:.3f} vs Adam best fixed lr "
           f"{state.unseen.adam_best_fixed:.3f}; per-task tuned {state.unseen.adam_tuned:.3f}"]
          if state.unseen else []),
        f"inner steps/s {_count(rate)} ({_count(rate / workers)} per core, {state.workers} workers)   "
        f"units in flight {in_flight}   worker restarts {state.worker_restarts}   failed units {state.failed_units}",
        f"PBT {next_pbt} ({state.pbt_events:,} tournaments)   next checkpoint in {next_checkpoint}   "
        f"rollbacks {state.rollbacks}   inner steps {state.inner_steps:,}",
    ]  # fmt: skip


def render(state: DashboardState, in_flight: int = 0, now: float | None = None, width: int = 120,
           height: int = 50) -> Group:
    """The whole screen for ``state`` on a ``width`` x ``height`` terminal;
    ``now`` (wall time) advances the clocks between records. On a short
    terminal the events panel gives way first, so every member's row and the
    current phase always show."""
    now = time.time() if now is None else now
    elapsed = state.elapsed + (max(0.0, now - state.received) if state.received else 0.0)
    resumed = "new population" if state.resumed_from is None else f"resumed from round {state.resumed_from}"
    header = Text.assemble(
        (f"selfloop · {state.run_name}", "bold"), f"   {resumed}   ", (f"round {state.round:,}", "bold"),
        f"   run time {_duration(elapsed)}   {state.run_dir}\n", ("now: ", "bold"), state.status,
        no_wrap=True, overflow="ellipsis",
    )  # fmt: skip
    health_lines = _health_lines(state, in_flight, elapsed)
    # Rows: header panel 4, members n + 3, health lines + 2, events panel lines + 2.
    room = height - 4 - (len(state.members) + 3) - (len(health_lines) + 2)
    shown = min(EVENTS_SHOWN, room - 2)
    if shown < 1:  # no room for the panel: the newest event joins the health lines, or they shrink
        health_lines = health_lines[: max(1, len(health_lines) + room - 1)]
        if state.events and room >= 1:
            health_lines.append(f"last event: {state.events[-1]}")
    health = Text("\n".join(health_lines), no_wrap=True, overflow="ellipsis")
    panels = [
        Panel(header, padding=(0, 1)),
        Panel(member_table(state, width), title="members: held-out mean normalized loss, lower is better; "
                                                "* weights replaced since"),
        Panel(health, title="progress and health"),
    ]  # fmt: skip
    if shown >= 1:
        lines = list(state.events)[-shown:] or ["no PBT events yet"]
        events = Text("\n".join(lines), no_wrap=True, overflow="ellipsis")
        panels.insert(2, Panel(events, title="recent PBT events, rollbacks and rejected steps", height=shown + 2))
    return Group(*panels)


class LiveDashboard:
    """A reporter (``dashboard(event)``) that shows a rich ``Live`` screen while open."""

    def __init__(self, in_flight=lambda: 0, console: Console | None = None, refresh_per_second: float = 4.0):
        self.state = DashboardState()
        self.lock = threading.Lock()
        self.in_flight = in_flight
        # Prints from the master (warnings) are shown above the screen, not through it.
        self.console = console or Console()
        self.live = Live(console=self.console, get_renderable=self._snapshot, refresh_per_second=refresh_per_second)

    def __call__(self, event: ev.Event) -> None:
        with self.lock:
            apply(self.state, event)

    def _snapshot(self) -> Group:
        with self.lock:
            state = copy.deepcopy(self.state)
        width, height = self.console.size
        return render(state, self.in_flight(), width=width, height=height)

    def __enter__(self) -> LiveDashboard:
        self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        self.live.stop()


def watch(events: str, follow: bool = True, seconds: float = 0.0) -> None:
    """Show the live dashboard of the run whose ``events.jsonl`` is ``events``
    (from another terminal, or another node on the shared filesystem): its
    events so far, then new ones as the master appends them (``follow``),
    for ``seconds`` (0: until Ctrl-C)."""
    from pathlib import Path

    dashboard = LiveDashboard()
    path, position, started = Path(events), 0, time.time()
    with dashboard:
        try:
            while True:
                with path.open("rb") as handle:
                    handle.seek(position)
                    for line in iter(handle.readline, b""):
                        if not line.endswith(b"\n"):
                            break  # the master is still writing it
                        position += len(line)
                        event = ev.parse_line(line, f"{path}, byte {position - len(line)}")
                        if event is not None:
                            dashboard(event)
                if (seconds and time.time() - started >= seconds) or not (follow or seconds):
                    return
                time.sleep(0.5)
        except KeyboardInterrupt:
            return


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="watch a run's live dashboard from its events.jsonl")
    parser.add_argument("events", help="a run's events.jsonl (e.g. checkpoints/default/events.jsonl)")
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after this long (default: Ctrl-C)")
    args = parser.parse_args(argv)
    watch(args.events, seconds=args.seconds)


if __name__ == "__main__":
    main()
