"""Faults a long run meets, tried on the real command line; prints a table.

    python bench/faults.py                 # bad input, stops in every phase, time limits
    python bench/faults.py --soak 20       # kill -9 at random moments, then resume, 20 times

Each case records the exit status, the first line of the message (a
traceback anywhere is a failure), the seconds it took, and, where a run was
cut, whether it then resumes. The soak kills the master at random moments
(mid-round, mid-evaluation, mid-checkpoint-write) and checks that every
restart resumes, loses at most one checkpoint interval, and that the event
log's timeline stays continuous.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selfloop.events import Round, read_events
from selfloop.store.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parent.parent
SMOKE_LOCAL = ("--config", "configs/smoke.toml", "--set", "farm.engine='local'", "--workers", "1",
               "--dashboard", "plain")  # fmt: skip
LONG_EVAL = ("--set", "eval.tasks=24", "--set", "eval.steps=2000", "--set", "eval.chunk=100", "--max-rounds",
             "100000")  # fmt: skip


def run_py(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "run.py"), *args]


def finish(process: subprocess.Popen, started: float, timeout: float = 600) -> tuple[int, str, float]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output, time.monotonic() - started


def first_message(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(("error:", "SIG", "note:"))]
    return (lines[0] if lines else output.strip().splitlines()[-1] if output.strip() else "")[:90]


def stop_in_phase(run_dir: Path, cache: str, marker: str, signals: int) -> tuple[int, str, float]:
    """Start a run, send ``signals`` SIGINTs once a line starts with ``marker``;
    (status, output, seconds from the first signal to the exit)."""
    process = subprocess.Popen(run_py(*SMOKE_LOCAL, *LONG_EVAL, "--checkpoint-dir", str(run_dir),
                                      "--compile-cache", cache),
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(marker):
            break
    started = time.monotonic()
    for _ in range(signals):
        process.send_signal(signal.SIGINT)
        time.sleep(0.2)
    code, rest, took = finish(process, started)
    return code, "".join(seen) + rest, took


def resumes(run_dir: Path, cache: str) -> bool:
    result = subprocess.run(run_py("--checkpoint-dir", str(run_dir), "--compile-cache", cache, "--max-rounds", "1",
                                   "--set", "eval.tasks=2", "--set", "eval.steps=20", "--set", "eval.chunk=10",
                                   "--dashboard", "plain"),
                            cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    return result.returncode == 0 and "resumed from round" in result.stdout


def fault_table(work: Path) -> None:
    cache = str(work / "jax_cache")
    rows = []

    def record(case: str, code: int, output: str, took: float, expected: int, resumed: str = "-") -> None:
        ok = code == expected and "Traceback" not in output and resumed in ("-", "yes")
        rows.append((case, code, first_message(output), f"{took:.1f}", resumed, "ok" if ok else "FAIL"))
        print(f"{case}: exit {code} in {took:.1f} s", flush=True)

    for number, (case, marker, signals) in enumerate((
        ("Ctrl-C while compiling", "...   compiling", 1),
        ("Ctrl-C during the Adam reference", "...   Adam reference", 1),
        ("Ctrl-C during an evaluation", "...   evaluating", 1),
        ("Ctrl-C during a round", "round ", 1),
        ("Ctrl-C twice during the Adam reference", "...   Adam reference", 2),
    )):  # fmt: skip
        run_dir = work / f"stop{number}"
        code, output, took = stop_in_phase(run_dir, cache, marker, signals)
        record(case, code, output, took, 130, "yes" if resumes(run_dir, cache) else "no")

    timed = (("--max-minutes 1, configs/paper.toml", ("--config", "configs/paper.toml")),
             ("--max-minutes 1, default with lopt.arch=hierarchical",
              ("--set", "lopt.arch='hierarchical'", "--set", "lopt.features='per_tensor'", "--set", "lopt.odd=false")))
    for number, (case, args) in enumerate(timed):
        started = time.monotonic()
        process = subprocess.Popen(run_py(*args, "--max-minutes", "1", "--checkpoint-dir", str(work / f"timed{number}"),
                                          "--compile-cache", cache, "--dashboard", "plain"),
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        code, output, took = finish(process, started)
        record(f"{case} (limit 90 s)", code, output, took, 0 if took <= 90 else -1)

    target_file = work / "a_file"
    target_file.write_text("x")
    bad = (
        ("checkpoint dir is a file", ("--checkpoint-dir", str(target_file))),
        ("empty checkpoint dir", ("--checkpoint-dir", "")),
        ("estimator.std = inf", ("--set", "estimator.std=inf")),
        ("run.dashboard = fancy", ("--set", "run.dashboard='fancy'")),
        ("unreachable Dask scheduler", ("--scheduler", "tcp://127.0.0.1:9", "--set", "farm.connect_seconds=2")),
        ("export --member m12", ("export", "--member", "m12", "--out", str(work / "x.h5"))),
        ("eval --optimizer missing.h5", ("eval", "--optimizer", str(work / "missing.h5"))),
    )
    smoke_run = work / "stop3"
    for case, args in bad:
        command = list(args) if args[0] in ("export", "eval") else ["--config", "configs/smoke.toml", *args]
        if args[0] in ("export", "eval"):
            command[1:1] = ["--checkpoint-dir", str(smoke_run)]
        started = time.monotonic()
        result = subprocess.run(run_py(*command), cwd=REPO, capture_output=True, text=True, timeout=300)
        record(case, result.returncode, result.stderr + result.stdout, time.monotonic() - started, 2)

    print("\n| fault | exit | message | seconds | resumes | verdict |\n|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x).replace("|", "/") for x in row) + " |")
    failed = sum(row[-1] != "ok" for row in rows)
    print(f"\n{len(rows) - failed}/{len(rows)} faults handled")


def soak(work: Path, kills: int, seed: int) -> None:
    """``kills`` kill -9 of the master at random moments, each followed by a resume."""
    rng = random.Random(seed)
    cache, run_dir = str(work / "jax_cache"), work / "soak"
    # Evaluations every 4 rounds and a checkpoint every 3, so kills land in both.
    args = (*SMOKE_LOCAL, "--checkpoint-dir", str(run_dir), "--compile-cache", cache, "--max-rounds", "100000",
            "--set", "eval.interval_rounds=4", "--set", "eval.tasks=8", "--set", "eval.steps=400",
            "--set", "eval.chunk=50", "--set", "checkpoint.interval_rounds=3")  # fmt: skip
    lost = []
    for kill in range(kills):
        process = subprocess.Popen(run_py(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(6.0, 20.0))
        before = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()
                  if line.endswith("}")]  # fmt: skip
        rounds = [r["round"] for r in before if r["kind"] == "round"]
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        newest = int(list_checkpoints(run_dir)[0].stem.split("-")[1]) if list_checkpoints(run_dir) else 0
        lost.append((max(rounds) if rounds else 0) - newest)
        phase = before[-1]["kind"] if before else "start"
        print(f"kill {kill + 1}: newest round logged {max(rounds, default=0)}, last record {phase!r}; "
              f"newest checkpoint round {newest}", flush=True)
    final = subprocess.run(run_py(*args, "--max-rounds", "1"), cwd=REPO, capture_output=True, text=True)
    raw = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    resumed = sum(r["kind"] == "resume" for r in raw)  # every session's, kept or undone by a later crash
    timeline = [e.round for e in read_events(run_dir / "events.jsonl") if isinstance(e, Round)]
    continuous = all(b == a + 1 for a, b in zip(timeline, timeline[1:]))
    print(f"\n{kills} kill -9: {resumed} of {kills} restarts resumed from a checkpoint; "
          f"rounds lost per kill: max {max(lost)}, at most a checkpoint interval (3) plus the round in progress: "
          f"{max(lost) <= 4}; surviving timeline continuous: {continuous}; final resume exit {final.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soak", type=int, default=0, help="kill -9 the master this many times instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="selfloop-faults-") as work:
        if args.soak:
            soak(Path(work), args.soak, args.seed)
        else:
            fault_table(Path(work))


if __name__ == "__main__":
    main()
