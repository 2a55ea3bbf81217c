"""Fault injection on the command line: stops in every phase, limits, bad input.

Each case checks the exit code, the one-line message (never a traceback),
that nothing was lost, and where a run was cut that it resumes.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from selfloop.events import from_record
from selfloop.farm.engines import WORKER_MEMORY_BYTES, usable_workers
from selfloop.store.checkpoint import list_checkpoints, read_checkpoint, saved_config

REPO = Path(__file__).resolve().parent.parent
# The smoke loop on real worker processes, with held-out work long enough that
# preparation and evaluation are phases one can interrupt.
LONG_PHASES = ("--config", "configs/smoke.toml", "--set", "farm.engine='local'", "--workers", "1",
               "--set", "eval.tasks=8", "--set", "eval.steps=1000", "--set", "eval.chunk=100",
               "--dashboard", "plain", "--max-rounds", "100000")  # fmt: skip


def _command(*args: str) -> list[str]:
    return [sys.executable, "run.py", *args]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_command(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


class Master:
    """``run.py`` in the background, its output read line by line."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(_command(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)  # fmt: skip
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, start: str, timeout: float = 240) -> str:
        """The first line that starts with ``start`` (after the ones already read)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if line.startswith(start):
                return line
        self.process.kill()
        raise AssertionError(f"never printed {start!r}; output:\n{''.join(self.seen)[-3000:]}")

    def output(self) -> str:
        while (line := self.lines.get(timeout=30)) is not None:
            self.seen.append(line)
        return "".join(self.seen)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["...   Adam reference", "...   evaluating", "round "])
def test_one_ctrl_c_in_any_phase_stops_within_5_s_keeping_the_last_checkpoint(tmp_path, compile_cache, phase):
    run_dir = tmp_path / "run"
    master = Master(*LONG_PHASES, "--checkpoint-dir", str(run_dir), "--compile-cache", compile_cache)
    master.wait_for(phase)
    os.kill(master.process.pid, signal.SIGINT)
    sent = time.monotonic()
    code = master.process.wait(timeout=30)
    took = time.monotonic() - sent
    output = master.output()
    assert code == 130 and took < 5.0, (took, output[-2000:])
    assert "Traceback" not in output
    newest = list_checkpoints(run_dir)[0]
    state = read_checkpoint(newest, saved_config(newest))  # the last good state, readable
    records = [from_record(json.loads(line)) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert records[-1].kind == "end" and records[-1].reason.startswith("SIGINT")
    assert records[-1].round == state.round
    evaluations = [r for r in records if r.kind == "eval"]
    if evaluations:  # cut after an evaluation: the end line reports it, not NaN
        assert records[-1].end_best == evaluations[-1].best
        assert records[-1].adam_best_fixed == evaluations[-1].adam_best_fixed


@pytest.mark.slow
def test_a_second_sigterm_exits_at_once_and_the_run_resumes(tmp_path, compile_cache):
    run_dir = tmp_path / "run"
    master = Master(*LONG_PHASES, "--checkpoint-dir", str(run_dir), "--compile-cache", compile_cache)
    master.wait_for("...   Adam reference")
    os.kill(master.process.pid, signal.SIGTERM)
    time.sleep(0.2)
    os.kill(master.process.pid, signal.SIGTERM)
    sent = time.monotonic()
    assert master.process.wait(timeout=30) == 130 and time.monotonic() - sent < 3.0
    assert "exiting now" in master.output() and "Traceback" not in "".join(master.seen)
    resumed = _run("--checkpoint-dir", str(run_dir), "--compile-cache", compile_cache, "--max-rounds", "2",
                   "--set", "eval.tasks=2", "--set", "eval.steps=20", "--set", "eval.chunk=10")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]


@pytest.mark.slow
def test_workers_die_with_a_killed_master(tmp_path, compile_cache):
    master = Master(*LONG_PHASES, "--checkpoint-dir", str(tmp_path / "run"), "--compile-cache", compile_cache)
    master.wait_for("...   Adam reference")
    workers = _children(master.process.pid)
    assert workers and all(_alive(w) for w in workers)
    os.kill(master.process.pid, signal.SIGKILL)
    master.process.wait(timeout=10)
    deadline = time.monotonic() + 5
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)


@pytest.mark.slow
def test_the_time_limit_cuts_a_long_evaluation_and_progress_is_shown(tmp_path, compile_cache):
    run_dir = tmp_path / "run"
    # 100 held-out tasks x 20k steps: the Adam reference alone would take many minutes.
    started = time.monotonic()
    result = _run(*LONG_PHASES, "--checkpoint-dir", str(run_dir), "--compile-cache", compile_cache,
                  "--max-minutes", "0.05",
                  "--set", "eval.tasks=100", "--set", "eval.steps=20000", "--set", "eval.chunk=500")  # fmt: skip
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert took < 0.05 * 60 + 15 + 15, took  # budget + grace + the interpreter's start
    assert "units" in result.stdout  # a phase's progress: "<phase>: done/total units"
    records = [from_record(json.loads(line)) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert records[-1].kind == "end" and list_checkpoints(run_dir)


def test_workers_are_capped_to_the_cores_and_the_memory_available():
    cores, plenty = len(os.sched_getaffinity(0)), 10**15
    assert usable_workers(0, plenty) == (cores, "") and usable_workers(1, plenty) == (1, "")
    count, why = usable_workers(999, plenty)
    assert count == cores and f"capped to the {cores} cores available" in why
    count, why = usable_workers(0, 3 * WORKER_MEMORY_BYTES // 2)
    assert count == 1 and "GB of memory available" in why


def test_a_capped_worker_count_is_said_on_the_run(tmp_path, compile_cache):
    result = _run("--config", "configs/smoke.toml", "--set", "farm.engine='local'", "--workers", "999",
                  "--checkpoint-dir", str(tmp_path / "run"), "--compile-cache", compile_cache, "--max-rounds", "1",
                  "--dashboard", "plain")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "farm.workers = 999: capped to" in result.stdout


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, compile_cache) -> Path:
    """A finished smoke run made with configs/smoke.toml."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    result = _run("--config", "configs/smoke.toml", "--checkpoint-dir", str(run_dir), "--compile-cache", compile_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def test_eval_and_export_read_the_config_the_run_was_made_with(smoke_run, tmp_path):
    # No --config: the run directory's own config (4 members), not the defaults (10).
    exported = _run("export", "--checkpoint-dir", str(smoke_run), "--member", "m1", "--out", str(tmp_path / "m1.h5"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "exported member m1" in exported.stdout
    evaluated = _run("eval", "--checkpoint-dir", str(smoke_run), "--tasks", "2", "--steps", "20",
                     "--out", str(tmp_path / "eval"))  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "m3" in evaluated.stdout and (tmp_path / "eval" / "metrics.csv").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (("export", "--member", "m9", "--out", "{tmp}/x.h5"), "--member: expected 'best', 'champion' or a member"),
        (("export", "--member", "three", "--out", "{tmp}/x.h5"), "--member: expected"),
        (("eval", "--optimizer", "{tmp}/missing.h5"), "missing.h5: no such optimizer file"),
        (("eval", "--optimizer", "{run}/events.jsonl"), "events.jsonl: unreadable optimizer file"),
    ],
)
def test_bad_members_and_optimizer_files_exit_2_naming_them(smoke_run, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, run=smoke_run) for a in args]
    result = _run(args[0], "--checkpoint-dir", str(smoke_run), *args[1:])
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    "setup,args,message",
    [
        ("file", (), "is a file, not a directory"),
        (None, ("--checkpoint-dir", ""), "run.checkpoint_dir: expected a non-empty string"),
        (None, ("--set", "estimator.std=inf"), "estimator.std: expected a finite positive number"),
        (None, ("--set", "run.dashboard='fancy'"), "run.dashboard: expected one of"),
        (None, ("--scheduler", "tcp://127.0.0.1:9", "--set", "farm.connect_seconds=1"),
         "cannot reach the Dask scheduler at tcp://127.0.0.1:9"),
    ],
)
def test_bad_run_input_exits_2_with_one_line_and_writes_nothing(tmp_path, setup, args, message):
    target = tmp_path / "run"
    if setup == "file":
        target.write_text("not a directory")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _run("--config", "configs/smoke.toml", "--checkpoint-dir", str(target), *args, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    if setup == "file":
        assert target.read_text() == "not a directory"
    elif message.startswith("cannot reach"):
        pass  # the run directory was made before the farm was asked for
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == before
