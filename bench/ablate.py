"""Issue #8's ablation: the default run, then each gain-keeping mechanism off in turn.

Every run is ``run.py`` on the same config and seed for the same budget, in its
own checkpoint directory under ``--out``, one after another (each takes every
core); then the ablation table of ``selfloop.observe.history`` over all of them. Runs
that already reached the budget are read, not rerun, and a run that was cut
short is resumed for the minutes it lacks, so the whole sweep can be stopped
and started again.

    python bench/ablate.py --minutes 20                       # 8 runs, ~3 hours on 2 cores
    python bench/ablate.py --minutes 20 --only "all on" "no guard"
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from selfloop.events import read_events
from selfloop.observe.history import ablation_table, within

REPO = Path(__file__).resolve().parent.parent

# Each mechanism's switch (README "What a run does", BENCHMARKS.md "Keeping the gains").
ABLATIONS: dict[str, tuple[str, ...]] = {
    "all on": (),
    "no guard": ("guard.rollback=false",),
    "no step rail": ("population.max_step_ratio=0",),
    "1 % step rail": ("population.max_step_ratio=0.01",),
    "no champion": ("pbt.champion=false",),
    "no challenge": ("pbt.champion_confirm_tasks=0",),
    "15 s tournaments": ("pbt.interval_seconds=15.0",),
    "no time clamp": ("population.clamp_outer_time=false",),
}


def run_dir_for(out: Path, name: str) -> Path:
    return out / name.replace(" ", "-").replace("%", "pct")


def run_minutes(events: Path) -> float:
    """Run time a log has reached (0 when there is none)."""
    if not events.exists():
        return 0.0
    times = (getattr(e, "elapsed", 0.0) for e in read_events(events))
    return max((t for t in times if t == t), default=0.0) / 60.0  # a tournament's may be nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="run time of every run")
    parser.add_argument("--out", type=Path, default=REPO / "checkpoints" / "ablation")
    parser.add_argument("--config", help="TOML changes to the default config (default: none)")
    parser.add_argument("--only", nargs="+", choices=list(ABLATIONS), help="these runs only")
    parser.add_argument("--table-only", action="store_true", help="start nothing; tabulate what is there")
    args = parser.parse_args()
    names = args.only or list(ABLATIONS)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        run_dir = run_dir_for(args.out, name)
        missing = args.minutes - run_minutes(run_dir / "events.jsonl")
        if args.table_only or missing < 0.05:
            continue
        command = [sys.executable, str(REPO / "run.py"), *(["--config", args.config] if args.config else []),
                   "--checkpoint-dir", str(run_dir), "--max-minutes", f"{missing:.2f}", "--dashboard", "plain"]
        command += [item for override in ABLATIONS[name] for item in ("--set", override)]
        print(f"[{name}] {missing:.1f} min: {' '.join(command[1:])}", flush=True)
        log_path = args.out / f"{run_dir.name}.log"
        with log_path.open("a") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
        if code != 0:
            print(f"[{name}] run.py exited with status {code}; its output: {log_path}", flush=True)
    runs = {}
    for name in names:
        events = run_dir_for(args.out, name) / "events.jsonl"
        if events.exists():
            runs[name] = within(read_events(events), args.minutes)
    if not runs:
        raise SystemExit(f"{args.out}: no run has an events.jsonl yet")
    print(ablation_table(runs))


if __name__ == "__main__":
    main()
