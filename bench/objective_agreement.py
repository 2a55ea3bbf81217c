"""Does the tournament's score rank optimizers the way the held-out set does?

Takes optimizers that differ: every member of up to ``--checkpoints`` kept
checkpoints of each run given, spread over its rounds (duplicates, the copies
PBT makes, counted once). Trains each on ``--tasks`` fresh training-distribution
tasks for ``pbt.steps`` steps, and on the run's held-out set (and its unseen
families, if the run left some out) as the run's evaluation does. Then prints
the held-out set's agreement with itself (two random halves of its tasks) and,
for several per-task scores computed from the same training curves:

- the Spearman rank correlation of their mean over all the training tasks
  with the held-out score (the score's own agreement, without sampling noise);
- its median when the mean is over only E tasks, as a tournament sees them;
- how often a comparison of two optimizers on E tasks orders them as the
  held-out set does (over the pairs 0.005+ apart there): what a tournament decides.

Scores (lower is better; per task, then averaged over tasks):

- ``ratio``: mean over the steps of ℓ/ℓ_init, clipped (the tournament's score);
- ``log ratio``: mean over the steps of log(ℓ/ℓ_init), of the clipped ratio;
- ``final ratio``: ℓ/ℓ_init after the last step;
- ``first 40``: ``ratio`` over the first 40 steps, as one truncation of the
  meta-objective sees an episode's start;
- ``rank``: the optimizer's rank among all of them on that task (0: best),
  divided by their number: a score that ignores how far apart they are;
- ``to floor``: mean over the steps of (ℓ - ℓ_min)/(ℓ_init - ℓ_min), ℓ_min the
  lowest loss any of the optimizers reached on that task: the held-out
  set's normalization with the contestants' best in place of Adam's, which a
  tournament can compute. Per task it orders optimizers as ``ratio`` does;
  it weighs tasks as the held-out set does, by how far they can fall.

    python bench/objective_agreement.py RUN [RUN ...] --checkpoints 4 --min-round 200 --tasks 90
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from ranking import spearman

from selfloop.evaluation.heldout import adam_reference, heldout_task_scores
from selfloop.farm.curves import CurveUnit, run_curve_unit, stack_thetas
from selfloop.farm.engines import LocalFarm, reporting_progress
from selfloop.farm.worker import configure_jax
from selfloop.master.pbt import same_weights, tournament_tasks
from selfloop.store.checkpoint import read_checkpoint, saved_config
from selfloop.store.rundir import RunDir
from selfloop.tasks.normalize import ratio_to_initial
from selfloop.tasks.sampler import heldout_tasks, unseen_family_tasks

STREAM = 0x0B1  # this bench's training tasks, disjoint from any run's tournaments
FIRST_STEPS = 40


def spread_checkpoints(run_dir: Path, count: int, min_round: int) -> list[Path]:
    """Up to ``count`` of the run's kept checkpoints from ``min_round`` on, evenly
    spaced over them, oldest first."""
    found = RunDir(run_dir)
    kept = [p for p, r in zip(found.checkpoints()[::-1], found.checkpoint_rounds()[::-1]) if r >= min_round]
    if not kept:
        raise SystemExit(f"{run_dir}: no checkpoint at round {min_round} or later")
    picks = np.unique(np.linspace(0, len(kept) - 1, min(count, len(kept))).round().astype(int))
    return [kept[i] for i in picks]


def gather_optimizers(run_dirs: list[Path], count: int, min_round: int):
    """(config of the first run, [(name, theta)]) over the picked checkpoints'
    members; a member identical to one already taken is skipped."""
    config, taken = None, []
    for run_dir in run_dirs:
        for path in spread_checkpoints(run_dir, count, min_round):
            run_config = saved_config(path)
            config = config or run_config
            if run_config.lopt != config.lopt:
                raise SystemExit(f"{path}: lopt {run_config.lopt} differs from the first run's {config.lopt}")
            state = read_checkpoint(path, run_config)
            for index, member in enumerate(state.members):
                if not any(same_weights(member.theta, theta) for _, theta in taken):
                    taken.append((f"{run_dir.name}@{state.round}/m{index}", member.theta))
    return config, taken


def task_score_table(curves: list[np.ndarray]) -> dict[str, np.ndarray]:
    """{score: [task, optimizer]} from each task's [steps + 1, optimizer] curves."""
    ratios = [ratio_to_initial(c, c[0:1]) for c in curves]
    logs = [np.log(np.maximum(r, 1e-6)) for r in ratios]
    ratio = np.stack([r.mean(axis=0) for r in ratios])
    floors = [np.min(np.where(np.isfinite(c), c, np.inf), axis=(0, 1), keepdims=True) for c in curves]
    to_floor = [ratio_to_initial(c - f, c[0:1] - f) for c, f in zip(curves, floors)]
    return {
        "ratio": ratio,
        "log ratio": np.stack([x.mean(axis=0) for x in logs]),
        "final ratio": np.stack([r[-1] for r in ratios]),
        f"first {FIRST_STEPS}": np.stack([r[: FIRST_STEPS + 1].mean(axis=0) for r in ratios]),
        "rank": np.argsort(np.argsort(ratio, axis=1), axis=1) / ratio.shape[1],
        "to floor": np.stack([r.mean(axis=0) for r in to_floor]),
    }


def sampled_spearman(per_task: np.ndarray, heldout: np.ndarray, size: int, draws: int,
                     rng: np.random.Generator) -> float:
    """Median Spearman with ``heldout`` of the mean over ``size`` tasks drawn at random."""
    drawn = rng.integers(per_task.shape[0], size=(draws, size))
    return float(np.median([spearman(per_task[rows].mean(axis=0), heldout) for rows in drawn]))


def split_half_spearman(per_task: np.ndarray, draws: int, rng: np.random.Generator) -> float:
    """Median Spearman between the means over two random halves of the tasks."""
    values = []
    for _ in range(draws):
        order = rng.permutation(per_task.shape[0])
        half = len(order) // 2
        values.append(spearman(per_task[order[:half]].mean(axis=0), per_task[order[half:]].mean(axis=0)))
    return float(np.median(values))


def pair_agreement(per_task: np.ndarray, heldout: np.ndarray, size: int, draws: int,
                   rng: np.random.Generator, margin: float = 0.005) -> float:
    """P(a mean over ``size`` drawn tasks orders two optimizers as ``heldout`` does),
    over the pairs at least ``margin`` apart on ``heldout``."""
    n = len(heldout)
    pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n) if abs(heldout[i] - heldout[j]) >= margin])
    if not len(pairs):
        return float("nan")
    drawn = rng.integers(per_task.shape[0], size=(draws, size))
    means = per_task[drawn].mean(axis=1)  # [draw, optimizer]
    first, second = pairs[:, 0], pairs[:, 1]
    agree = np.sign(means[:, first] - means[:, second]) == np.sign(heldout[first] - heldout[second])
    return float(agree.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--checkpoints", type=int, default=4, help="kept checkpoints per run, spread over its rounds")
    parser.add_argument("--min-round", type=int, default=1,
                        help="only checkpoints from this round on (round 0 is the random initialization)")
    parser.add_argument("--tasks", type=int, default=90, help="fresh training-distribution tasks")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16], help="tasks per comparison, E")
    parser.add_argument("--draws", type=int, default=400, help="resamples per figure")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "selfloop-bench-cache"))
    args = parser.parse_args()
    config, optimizers = gather_optimizers(args.run_dirs, args.checkpoints, args.min_round)
    names, thetas = [n for n, _ in optimizers], [t for _, t in optimizers]
    cfg = config.eval
    heldout_sets = {"held-out": heldout_tasks(cfg.tasks, config.tasks.families, cfg.seed)}
    unseen = unseen_family_tasks(cfg.tasks, config.tasks.families, cfg.unseen_families, cfg.seed)
    if unseen:
        heldout_sets["unseen families"] = unseen
    specs = tournament_tasks(config, 0, args.tasks, STREAM)
    configure_jax(args.cache)
    farm = LocalFarm(cache_root=args.cache, log_dir=Path(tempfile.mkdtemp()))
    farm.wait_ready()
    try:
        sets = ", ".join(f"{label} {len(held)}" for label, held in heldout_sets.items())
        print(f"{len(thetas)} optimizers from {len(args.run_dirs)} run(s); {args.tasks} training tasks × "
              f"{config.pbt.steps} steps; held-out sets: {sets}", flush=True)
        stacked = stack_thetas(thetas)
        units = [CurveUnit(spec, config.lopt, stacked, config.pbt.steps, config.pbt.chunk) for spec in specs]
        with reporting_progress(farm, lambda done, total: print(f"  {done}/{total} units", end="\r", flush=True)):
            print("training tasks", flush=True)
            curves = farm.map(run_curve_unit, units)
            scores = {}
            for label, held in heldout_sets.items():
                print(f"{label}: Adam's reference (cached in {args.run_dirs[0]}), then the optimizers", flush=True)
                reference = adam_reference(held, cfg.steps, cfg.chunk, farm.map, args.run_dirs[0])
                scores[label], _ = heldout_task_scores(farm.map, config.lopt, thetas, held, cfg.steps, cfg.chunk,
                                                       reference)
    finally:
        farm.close()
    tables = task_score_table(curves)
    rng = np.random.default_rng(0)
    for label, heldout_per_task in scores.items():
        heldout = heldout_per_task.mean(axis=0)
        print(f"\n{label}: {len(heldout)} optimizers from {heldout.min():.3f} to {heldout.max():.3f} "
              f"(median {np.median(heldout):.3f})")
        halves = split_half_spearman(heldout_per_task, args.draws, rng)
        print(f"  the held-out set against itself: Spearman of two random halves {halves:+.2f} (median over "
              f"splits), {2 * halves / (1 + halves):+.2f} for a whole set of this size (Spearman-Brown): "
              "about as high as any score can agree with it")
        header = f"  {'score':<14}{'all tasks':>10}" + "".join(f"{f'E={e}':>8}" for e in args.sizes)
        print("  Spearman with the held-out score (median over draws for E tasks)")
        print(header)
        for name, per_task in tables.items():
            row = [spearman(per_task.mean(axis=0), heldout)]
            row += [sampled_spearman(per_task, heldout, e, args.draws, rng) for e in args.sizes]
            print(f"  {name:<14}" + "".join(f"{v:>+10.2f}" if i == 0 else f"{v:>+8.2f}" for i, v in enumerate(row)))
        print("  P(a comparison on E tasks orders two optimizers as the held-out set does), pairs 0.005+ apart")
        print(f"  {'score':<14}{'':>10}" + "".join(f"{f'E={e}':>8}" for e in args.sizes))
        for name, per_task in tables.items():
            row = [pair_agreement(per_task, heldout, e, args.draws, rng) for e in args.sizes]
            print(f"  {name:<14}{'':>10}" + "".join(f"{v:>8.2f}" for v in row))
    best = {label: names[int(np.argmin(h.mean(axis=0)))] for label, h in scores.items()}
    print("\nbest on each held-out set: " + ", ".join(f"{k} {v}" for k, v in best.items()))


if __name__ == "__main__":
    main()
