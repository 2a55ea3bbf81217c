"""Does a held-out set of N tasks rank learned optimizers as the task distribution would?

Collects every member and the PBT champion from the newest checkpoint of each
given run, and scores them all side by side (mean over steps of ℓ/ℓ_init, the
tournament score) on the first ``--small`` held-out tasks, on the next
``--large`` held-out tasks (the same families in turn, disjoint instances),
and on ``--train`` fresh training-distribution tasks at several tournament
lengths. Prints Spearman rank correlations against the large set, over all
optimizers and over the good ones (large-set score below ``--good``), and the
best optimizers' scores. A small set whose ranking disagrees with the large
one cannot judge close comparisons, such as issue #8's criterion.

    python bench/heldout_size.py checkpoints/sig60 checkpoints/keep60 checkpoints/confirm60
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from ranking import spearman

from selfloop.config import load_config
from selfloop.farm.engines import LocalFarm
from selfloop.farm.worker import configure_jax
from selfloop.master.pbt import task_scores, tournament_tasks
from selfloop.store.checkpoint import CheckpointError, list_checkpoints, read_checkpoint
from selfloop.tasks.sampler import heldout_tasks

REPO = Path(__file__).resolve().parent.parent

STREAM = 0xA11  # fresh training tasks of this bench, disjoint from any run's tournaments


def collect(run_dirs: list[Path], config) -> tuple[list[str], list]:
    """(names, θs) of every member and champion in each run's newest readable checkpoint."""
    names, thetas = [], []
    for run_dir in run_dirs:
        paths = list_checkpoints(run_dir)
        if not paths:
            print(f"{run_dir}: no checkpoint, skipped", file=sys.stderr)
            continue
        try:
            state = read_checkpoint(paths[0], config)
        except CheckpointError as error:
            print(f"{run_dir}: skipped ({error})", file=sys.stderr)
            continue
        for i, member in enumerate(state.members):
            names.append(f"{run_dir.name}/m{i}")
            thetas.append(member.theta)
        if state.champion is not None:
            names.append(f"{run_dir.name}/champion")
            thetas.append(state.champion.theta)
    return names, thetas


def with_tournament_length(config, steps: int):
    return dataclasses.replace(config, pbt=dataclasses.replace(config.pbt, steps=steps, chunk=50))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--config", help="TOML changes to the default config (default: none)")
    parser.add_argument("--small", type=int, default=18, help="the small held-out set (its first tasks)")
    parser.add_argument("--large", type=int, default=72, help="further held-out tasks, the reference ranking")
    parser.add_argument("--train", type=int, default=24, help="fresh training-distribution tasks")
    parser.add_argument("--lengths", type=int, nargs="+", default=[150, 300, 600], help="tournament lengths")
    parser.add_argument("--good", type=float, default=0.45)
    args = parser.parse_args()
    config = load_config(args.config, ())
    names, thetas = collect(args.run_dirs, config)
    if len(thetas) < 3:
        raise SystemExit("fewer than 3 optimizers found: nothing to rank")
    cache = str(Path(tempfile.gettempdir()) / "selfloop-bench-cache")
    configure_jax(cache)
    contestants = [SimpleNamespace(theta=theta) for theta in thetas]
    heldout = heldout_tasks(args.small + args.large, config.tasks.families, config.eval.seed)
    training = tournament_tasks(config, 0, args.train, STREAM)
    farm = LocalFarm(cache_root=cache, log_dir=Path(tempfile.mkdtemp()))
    farm.wait_ready()
    try:
        per_task = task_scores(farm.map, with_tournament_length(config, config.eval.steps), contestants, list(heldout))
        scores = {f"held-out, first {args.small}": per_task[: args.small].mean(axis=0)}
        large = per_task[args.small :].mean(axis=0)
        for steps in args.lengths:
            at_length = with_tournament_length(config, steps)
            scores[f"{args.train} training tasks, {steps} steps"] = task_scores(
                farm.map, at_length, contestants, training
            ).mean(axis=0)
    finally:
        farm.close()
    good = large < args.good
    print(f"{len(thetas)} optimizers from {len(args.run_dirs)} runs; reference: held-out tasks "
          f"{args.small + 1}-{args.small + args.large} at {config.eval.steps} steps ({good.sum()} below {args.good})")
    print(f"{'ranking by':<40}{'Spearman, all':>15}{'good only':>11}")
    for name, values in scores.items():
        print(f"{name:<40}{spearman(values, large):>15.3f}{spearman(values[good], large[good]):>11.3f}")
    print(f"\n{'optimizer':<22}{'reference':>10}" + "".join(f"{name:>42}" for name in scores))
    for i in np.argsort(large)[:12]:
        print(f"{names[i]:<22}{large[i]:>10.3f}" + "".join(f"{values[i]:>42.3f}" for values in scores.values()))


if __name__ == "__main__":
    main()
