"""Many seeds of a config side by side, one run pinned to each core, then a table.

Self-training is noisy: one run proves little. This runs ``--seeds`` copies of
``run.py`` at once (seed 0..n-1, each pinned to its own core with taskset),
optionally a second variant given by ``--variant "--set k=v ..."`` on the next
cores, and summarizes each run's held-out evaluations from its event log.

    python bench/seeds.py --seeds 4 --minutes 10 [--variant "--set pbt.interval_seconds=15"]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from selfloop.events import Eval, of_type, read_events

REPO = Path(__file__).resolve().parent.parent


def launch(label: str, extra: list[str], seeds: int, first_core: int, args) -> list[tuple[str, int, subprocess.Popen]]:
    runs = []
    for seed in range(seeds):
        run_dir = Path(args.out) / f"{label}-seed{seed}"
        command = ["taskset", "-c", str(first_core + seed), sys.executable, str(REPO / "run.py"),
                   *(["--config", args.config] if args.config else []), "--checkpoint-dir", str(run_dir),
                   "--seed", str(seed),
                   "--max-minutes", str(args.minutes), "--fresh", *extra]
        log = open(Path(args.out) / f"{label}-seed{seed}.log", "w")
        runs.append((label, seed, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)))
    return runs


def describe(label: str, seed: int, out: Path) -> tuple[str, float, float, float]:
    evals = of_type(read_events(out / f"{label}-seed{seed}" / "events.jsonl"), Eval)
    start, end, lowest = evals[0].best, evals[-1].best, min(e.best for e in evals)
    print(f"{label:<10}{seed:>5}{start:>8.3f}{end:>8.3f}{lowest:>8.3f}{len(evals):>7}"
          f"{evals[-1].adam_best_fixed:>8.3f}{evals[-1].adam_tuned:>8.3f}")
    return label, start, end, lowest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML changes to the default config (default: none)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--variant", default=None, help="extra run.py arguments for a second group")
    parser.add_argument("--out", default="/tmp/selfloop-seeds")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    groups = [("base", [])] + ([("variant", shlex.split(args.variant))] if args.variant else [])
    needed = args.seeds * len(groups)
    if needed > len(os.sched_getaffinity(0)):
        raise SystemExit(f"{needed} runs need {needed} cores; this machine has {len(os.sched_getaffinity(0))}")
    runs = []
    for index, (label, extra) in enumerate(groups):
        runs += launch(label, extra, args.seeds, index * args.seeds, args)
    for _, _, process in runs:
        process.wait()
    print(f"variant: {args.variant}\n{'group':<10}{'seed':>5}{'start':>8}{'end':>8}{'lowest':>8}{'evals':>7}"
          f"{'adamfix':>8}{'tuned':>8}")
    rows = [describe(label, seed, Path(args.out)) for label, seed, _ in runs]
    for label, _ in groups:
        ends = [r[2] for r in rows if r[0] == label]
        halved = sum(r[2] <= 0.5 * r[1] for r in rows if r[0] == label)
        print(f"{label}: median end {statistics.median(ends):.3f}; halved in {halved}/{len(ends)} runs")


if __name__ == "__main__":
    main()
