"""Branch one run's newest checkpoint into variants that run side by side, each
pinned to its own cores, and compare what each does from the same state.

A paired experiment: every variant starts from the same population, champion
and held-out history, differs only in the ``--set`` overrides it names, and
shares the machine's load with the others for the same minutes. Two variants
with no overrides measure the noise band.

    python bench/branches.py checkpoints/default --minutes 7 --out /tmp/branches \\
        --variant control --variant control2 \\
        --variant rail1e-3 population.max_step_ratio=0.001

Needs ``2 * (variants)`` cores by default (``--cores-per-branch``); the
variants' run directories under ``--out`` are ordinary runs (resume them, read
them with ``python -m selfloop.observe.history``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from selfloop.events import Eval, Round, of_type, read_events
from selfloop.observe.history import inner_steps_at_evals, rail_use
from selfloop.store.checkpoint import list_checkpoints

RUN_PY = Path(__file__).resolve().parent.parent / "run.py"


def branch_dir(source: Path, target: Path) -> None:
    """``target`` as a copy of ``source``'s newest checkpoint, event log and Adam reference."""
    target.mkdir(parents=True)
    shutil.copy2(list_checkpoints(source)[0], target)
    shutil.copy2(source / "events.jsonl", target)
    for reference in source.glob("adam_reference_*.npz"):
        shutil.copy2(reference, target)


def branch_table(runs: dict[str, Path], branched_at: int) -> str:
    """Per variant: its evaluations since the branch point, on minutes and inner steps since it."""
    lines = ["| variant | evaluations since the branch: best member (champion) @ minutes, M inner steps "
             "| lowest | rail shortened |", "|---|---|---|---|"]
    for name, run_dir in runs.items():
        events = read_events(run_dir / "events.jsonl")
        start = next(e for e in reversed(events[:branched_at]) if isinstance(e, Round))
        new = events[branched_at:]  # what the branch wrote itself; its log starts with the source's
        evals = of_type(new, Eval)
        steps = inner_steps_at_evals(new)
        cells = [f"{e.best:.3f} ({e.champion:.3f}) @ {(e.elapsed - start.elapsed) / 60:.1f}, "
                 f"{(s - start.inner_steps) / 1e6:.2f}" for e, s in zip(evals, steps)]
        lowest = min((e.best for e in evals), default=float("nan"))
        rail = rail_use(new)
        shortened = f"{rail.shortened_fraction:.1%}" if rail.outer_steps else "-"
        lines.append(f"| {name} | {'; '.join(cells) or '-'} | {lowest:.3f} | {shortened} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the run directory to branch from")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"),
                        help="a variant's name and its section.key=value overrides")
    parser.add_argument("--minutes", type=float, default=7.0, help="each branch's session budget")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the branches' run directories")
    parser.add_argument("--cores-per-branch", type=int, default=2)
    parser.add_argument("--compile-cache", default=None, help="default: OUT/jax_cache, shared by the branches")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    needed = args.cores_per_branch * len(args.variant)
    if needed > len(cores):
        sys.exit(f"{len(args.variant)} variants x {args.cores_per_branch} cores need {needed} cores; "
                 f"this process may use {len(cores)}")
    if args.out.exists():
        sys.exit(f"{args.out}: exists; branches go to a new folder")
    branched_at = len(read_events(args.source / "events.jsonl"))
    cache = args.compile_cache or str(args.out / "jax_cache")
    runs, processes = {}, []
    for index, (name, *overrides) in enumerate(args.variant):
        run_dir = args.out / name
        branch_dir(args.source, run_dir)
        runs[name] = run_dir
        own = cores[index * args.cores_per_branch:(index + 1) * args.cores_per_branch]
        command = ["taskset", "-c", ",".join(map(str, own)), sys.executable, str(RUN_PY),
                   "--checkpoint-dir", str(run_dir), "--max-minutes", str(args.minutes), "--dashboard", "plain",
                   "--compile-cache", cache]
        for override in overrides:
            command += ["--set", override]
        log = open(args.out / f"{name}.log", "w")
        processes.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
        print(f"started {name} on cores {own}: {' '.join(overrides) or '(no overrides)'}", flush=True)
    started = time.monotonic()
    while any(p.poll() is None for _, p, _ in processes):
        time.sleep(15)
        running = [n for n, p, _ in processes if p.poll() is None]
        print(f"{(time.monotonic() - started) / 60:.1f} min: running {', '.join(running)}", flush=True)
    for name, process, log in processes:
        log.close()
        if process.returncode:
            print(f"{name}: exit {process.returncode} (see {args.out / name}.log)")
    print(branch_table(runs, branched_at))


if __name__ == "__main__":
    main()
