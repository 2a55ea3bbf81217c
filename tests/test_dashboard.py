"""The dashboard's render function at a fixed width, and the plain reporter, on a real run's records."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from rich.console import Console

from selfloop import events as ev
from selfloop.events import _jsonable, to_record
from selfloop.master.trainer import Trainer
from selfloop.observe.dashboard import DashboardState, apply, render, sparkline
from selfloop.observe.plain import PlainReporter
from tests.conftest import REPO, load_smoke_config


@pytest.fixture(scope="module")
def records(tmp_path_factory, compile_cache):
    """Every record of a 6-round smoke run (PBT every 2 rounds, a rollback-free guard)."""
    config = load_smoke_config(compile_cache)
    collected: list[ev.Event] = []
    trainer = Trainer(config, tmp_path_factory.mktemp("run"), report=collected.append)
    state = trainer.begin(None)
    trainer.prepare()
    trainer.train(state, max_rounds=6)
    return collected


def _screen(state: DashboardState, width: int = 120) -> str:
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(render(state, in_flight=3, now=state.received))
    return console.export_text()


def test_render_shows_members_events_and_numbers(records):
    state = DashboardState()
    for record in records:
        apply(state, record, now=100.0)
    screen = _screen(state)
    lines = screen.splitlines()
    assert max(len(line) for line in lines) <= 120 and len(lines) <= 40
    evals = [r for r in records if isinstance(r, ev.Eval)]
    last_round = [r for r in records if isinstance(r, ev.Round)][-1]
    pbt = [r for r in records if isinstance(r, ev.Tournament)]
    assert "selfloop · smoke" in screen and "new population" in screen and "round 6" in screen
    for i in range(4):  # one row per member: id, latest score, trainer, K
        row = next(line for line in lines if line.lstrip("│ ").startswith(f"m{i} "))
        assert f"{evals[-1].members[i]:.3f}" in row
        assert f"m{last_round.outer_index[i]}" in row and str(last_round.truncation[i]) in row
    assert f"m{pbt[-1].winner} ({pbt[-1].winner_score:.3f}) beat m{pbt[-1].loser}" in screen
    assert f"copied m{pbt[-1].winner} @r{pbt[-1].round}" in screen  # the loser's last event
    assert f"Adam best fixed lr {evals[-1].adam_best_fixed:.3f}" in screen
    # The champion is held-out scored beside the members once a tournament crowned one.
    assert evals[0].champion is None and evals[-1].champion is not None
    assert f"PBT champion {evals[-1].champion:.3f}" in screen
    assert "units in flight 3" in screen and "inner steps/s" in screen


def test_render_changes_as_the_run_moves_and_names_the_resume(records):
    state = DashboardState()
    middle = next(i for i, r in enumerate(records) if isinstance(r, ev.Round) and r.round == 3)
    for record in records[:middle]:
        apply(state, record, now=100.0)
    early = _screen(state)
    for record in records[middle:]:
        apply(state, record, now=100.0)
    assert _screen(state) != early
    apply(state, ev.Resume(6, 42.0, "checkpoint-000000006.h5", histories=((0.9, 0.8),) * 4,
                           last_event=("init",) * 4), now=100.0)  # fmt: skip
    start = next(r for r in records if isinstance(r, ev.Start))
    apply(state, dataclasses.replace(start, resumed_from=6), now=100.0)
    assert "resumed from round 6" in _screen(state)


def test_sparkline_follows_the_values():
    assert sparkline([1.0, 0.5, 0.0]) == "█▅▁"
    assert sparkline([float("nan")]) == "" and sparkline([0.3, 0.3]) == "▁▁"


def test_plain_reporter_prints_a_line_per_round_and_per_pbt_event(records):
    stream = io.StringIO()
    reporter = PlainReporter(stream)
    for record in records:
        reporter(record)
    lines = stream.getvalue().splitlines()
    rounds = [r for r in records if isinstance(r, ev.Round)]
    pbt = [r for r in records if isinstance(r, ev.Tournament)]
    assert len([line for line in lines if line.startswith("round ")]) == len(rounds) == 6
    assert len([line for line in lines if line.startswith("pbt ")]) == len(pbt) >= 1
    assert any(line.startswith("ckpt ") for line in lines) and lines[-1].startswith("end ")


def test_a_failed_evaluation_shows_what_went_wrong_in_the_log_and_on_the_dashboard():
    error = "Traceback (most recent call last):\n  ...\nValueError: boom\n"
    record = ev.EvalFailed(7, error)
    stream = io.StringIO()
    PlainReporter(stream)(record)
    assert stream.getvalue().strip() == "eval  round     7  failed: ValueError: boom"
    state = DashboardState()
    apply(state, record, now=0.0)
    assert "failed: ValueError: boom" in state.events[-1]


def test_clocks_advance_between_records(records):
    state = DashboardState()
    for record in records:
        apply(state, record, now=time.time())
    later = render(state, now=state.received + 3725)  # 1 h 2 min 5 s later
    console = Console(file=io.StringIO(), width=120, record=True, color_system=None)
    console.print(later)
    hours, rest = divmod(int(state.elapsed) + 3725, 3600)
    assert f"run time {hours}:{rest // 60:02d}:{rest % 60:02d}" in console.export_text()


def _ten_member_state(records, phase: str) -> DashboardState:
    """The smoke run's records on a population of 10, in the middle of ``phase``."""
    state = DashboardState()
    for record in records:
        apply(state, record, now=100.0)
    state.ensure_members(10)
    apply(state, ev.Progress(phase), now=100.0)
    return state


@pytest.mark.parametrize("width,height", [(80, 24), (200, 50)])
def test_every_member_row_and_the_current_phase_fit_the_terminal(records, width, height):
    state = _ten_member_state(records, "evaluating 11 optimizers on 90 held-out tasks x 300 steps")
    console = Console(file=io.StringIO(), width=width, height=height, record=True, color_system=None)
    console.print(render(state, now=100.0, width=width, height=height))
    lines = console.export_text().splitlines()
    assert len(lines) <= height and max(len(line) for line in lines) <= width
    for i in range(10):
        assert any(line.lstrip("│ ").startswith(f"m{i} ") for line in lines), f"no row for m{i}"
    assert any("now: evaluating 11 optimizers" in line for line in lines)
    assert any("held-out best" in line for line in lines)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.parametrize("width,height", [(80, 24), (200, 50)])
def test_the_watched_dashboard_in_a_tmux_pane(records, tmp_path, width, height):
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(to_record(r), default=_jsonable) + "\n" for r in records))
    session = f"selfloop-test-{width}x{height}-{os.getpid()}"
    command = f"{sys.executable} -m selfloop.observe.dashboard {events} --seconds 20"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", str(width), "-y", str(height), command],
                   check=True, cwd=REPO)  # fmt: skip
    try:
        deadline, pane = time.monotonic() + 15, ""
        while time.monotonic() < deadline and "progress and health" not in pane:
            time.sleep(0.5)
            pane = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                  text=True).stdout  # fmt: skip
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    lines = pane.splitlines()
    for i in range(4):
        assert any(line.lstrip("│ ").startswith(f"m{i} ") for line in lines), pane
    assert "now: finished" in pane and "selfloop · smoke" in pane


def test_numbers_stay_true_after_copies_and_resumes(records):
    state = DashboardState()
    for record in records:
        apply(state, record, now=100.0)
    pbt = next(r for r in records if isinstance(r, ev.Tournament))
    apply(state, dataclasses.replace(pbt, round=99), now=100.0)  # a copy after the last evaluation
    loser = next(line for line in _screen(state).splitlines() if line.lstrip("│ ").startswith(f"m{pbt.loser} "))
    assert "*" in loser  # its latest score belongs to the weights it just lost
    resumed = DashboardState()
    apply(resumed, next(r for r in records if isinstance(r, ev.Start)), now=100.0)
    resume = ev.Resume(6, 42.0, "checkpoint-000000006.h5", histories=((0.9, 0.5), (0.7, 0.4), (0.8,), ()),
                       last_event=("init",) * 4)  # fmt: skip
    apply(resumed, resume, now=100.0)
    apply(resumed, ev.Reference("set", adam_best_fixed=0.216, adam_tuned=0.156), now=100.0)
    screen = _screen(resumed)
    assert "m1 0.400 vs Adam best fixed lr 0.216" in screen and "per-task tuned 0.156" in screen
    later = render(resumed, now=100.0 + 600)  # preparing for 10 minutes: not run time
    console = Console(file=io.StringIO(), width=120, record=True, color_system=None)
    console.print(later)
    assert "run time 0:42" in console.export_text()
    state.pbt_interval = (3.0, 0)  # the default cadence: a countdown would read 0:0x throughout
    assert f"PBT every 3 s ({state.pbt_events:,} tournaments)" in _screen(state)
