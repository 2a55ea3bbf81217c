"""How far does a backpropagated meta-gradient predict its own objective?

At a run's measured θ (its PBT champion, or its best member where it keeps
none) or at ``--random-theta``, each of ``--tasks`` fresh training tasks is
advanced to the start of its ``segment``-th truncation of K steps. There the
segment's meta-loss L_i (the truncated objective a work unit differentiates:
the inner state at the segment's start held fixed, the same minibatches) and
its backpropagated gradient g_i are computed. θ is then moved by ε·‖θ‖ along
two unit directions d, and L_i is recomputed from the same start:

- ``own``: each task against its own gradient, d = −g_i/‖g_i‖, the steepest
  descent of that task's segment;
- ``mean``: every task against the mean of the tasks' unit gradients, the
  direction an outer step of the default estimator is pushed along.

A first-order model predicts ΔL_i = ε‖θ‖·(g_i·d). Where it holds, the
gradient is a fair guide at that distance; the distance at which the actual
change stops following it (``actual/predicted`` falls below about one half,
or the change turns positive) is the reach of the gradient. An outer step
moves θ by 0.05-0.3 % of ‖θ‖: if the gradient's reach at a trained θ is far
shorter than that, the objective is rough at the scale of the steps taken,
and its local gradient leads no lower, however well the tasks agree on it.

It prints one row per direction and distance: the median over tasks of the
predicted and the actual change of a task's meta-loss and of their ratio,
and the share of tasks whose meta-loss fell.

    python bench/gradient_reach.py RUN --setting 40:3 --tasks 24
    python bench/gradient_reach.py RUN --setting 40:3 --tasks 24 --random-theta
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path

import jax
import numpy as np
from jax.flatten_util import ravel_pytree
from metagrad import fresh_task
from outer_drift import subject_theta

from selfloop.estimators import estimate_gradient, needs_reset, new_slot
from selfloop.farm.engines import LocalFarm
from selfloop.lopt import make_lopt
from selfloop.master.population import context_for


def segment_start(context, theta, truncation: int, segment: int, task_index: int):
    """Fresh task ``task_index`` advanced by θ to its ``segment``-th truncation:
    (spec, slot, key) for that segment, or None where its episode ends first."""
    lopt = make_lopt(context.lopt)
    spec = fresh_task(context, task_index)
    slot = new_slot(lopt, spec, theta, context.estimator, context.horizon)
    key = jax.random.fold_in(jax.random.PRNGKey(context.seed), task_index)
    for index in range(segment - 1):
        slot = estimate_gradient(lopt, theta, spec, slot, truncation, context.estimator, context.horizon,
                                 jax.random.fold_in(key, index)).slot
        if needs_reset(slot):
            return None
    return spec, slot, jax.random.fold_in(key, segment - 1)


def segment_losses(context, theta, truncation: int, segment: int, moves: list[tuple[np.ndarray, float]],
                   task_index: int):
    """L_i at θ, g_i (flattened, as backpropagated), and L_i at θ − distance·d for
    every (d, distance) in ``moves``, where a direction None is the task's own
    unit gradient; () where the task's episode ends before the segment (a farm
    takes a None result for one not yet returned)."""
    start = segment_start(context, theta, truncation, segment, task_index)
    if start is None:
        return ()
    spec, slot, key = start
    lopt = make_lopt(context.lopt)
    flat, unflatten = ravel_pytree(theta)

    def estimate(at):
        return estimate_gradient(lopt, at, spec, slot, truncation, context.estimator, context.horizon, key)

    here = estimate(theta)
    gradient = np.asarray(ravel_pytree(here.gradient)[0], np.float64)
    own = gradient / max(np.linalg.norm(gradient), 1e-30)
    moved = []
    for direction, distance in moves:
        d = own if direction is None else direction
        moved.append(estimate(unflatten(flat - distance * d)).meta_loss)
    return here.meta_loss, gradient, np.asarray(moved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--setting", default="40:3", help="K:segment (segment 1 starts at the task's initialization)")
    parser.add_argument("--tasks", type=int, default=24, help="fresh training tasks")
    parser.add_argument("--distances", default="1e-5,1e-4,3e-4,1e-3,3e-3,1e-2", help="fractions of ‖θ‖")
    parser.add_argument("--random-theta", action="store_true", help="a random initialization instead of the run's")
    parser.add_argument("--cache", default="checkpoints/jax_cache")
    args = parser.parse_args()
    truncation, segment = (int(x) for x in args.setting.split(":"))
    fractions = [float(x) for x in args.distances.split(",")]
    path, config, theta, which = subject_theta(args.run_dir, args.random_theta)
    theta_norm = float(np.linalg.norm(ravel_pytree(theta)[0]))
    # As backpropagated: the first-order prediction needs each gradient's length.
    context = context_for(dataclasses.replace(config, estimator=dataclasses.replace(config.estimator, kind="grad",
                                                                                     grad_weight="none")))
    print(f"{path}: {which}; K = {truncation}, segment {segment}, {args.tasks} fresh training tasks")

    farm = LocalFarm(cache_root=args.cache)
    farm.wait_ready()
    try:
        # Pass 1: every task's own direction (and its gradient, for the mean direction).
        own_moves = [(None, f * theta_norm) for f in fractions]
        first = farm.map(functools.partial(segment_losses, context, theta, truncation, segment, own_moves),
                         list(range(args.tasks)))
        kept = [(i, r) for i, r in enumerate(first) if r]
        if len(kept) < 2:
            raise SystemExit(f"only {len(kept)} of {args.tasks} tasks reach segment {segment}")
        gradients = np.stack([r[1] for _, r in kept])
        unit = gradients / np.maximum(np.linalg.norm(gradients, axis=1, keepdims=True), 1e-30)
        mean = unit.mean(axis=0)
        mean /= max(np.linalg.norm(mean), 1e-30)
        # Pass 2: every task along the mean direction.
        mean_moves = [(mean, f * theta_norm) for f in fractions]
        second = farm.map(functools.partial(segment_losses, context, theta, truncation, segment, mean_moves),
                          [i for i, _ in kept])
    finally:
        farm.close()

    base = np.array([r[0] for _, r in kept])
    print(f"{len(kept)} tasks reach the segment; meta-loss at θ {base.mean():.4f}; "
          f"‖g‖ median {np.median(np.linalg.norm(gradients, axis=1)):.3g}; ‖θ‖ {theta_norm:.2f}")
    print("(medians over tasks: one task's backpropagated gradient can be orders of magnitude longer than the rest)")
    print("| direction | distance (of ‖θ‖) | predicted ΔL | actual ΔL | actual / predicted | tasks lower |")
    print("|---|---|---|---|---|---|")
    slopes = {"own": -np.linalg.norm(gradients, axis=1), "mean": -(gradients @ mean)}
    actual = {"own": np.stack([r[2] for _, r in kept]) - base[:, None],
              "mean": np.stack([r[2] for r in second]) - base[:, None]}
    for name in ("own", "mean"):
        for column, fraction in enumerate(fractions):
            predicted = slopes[name] * fraction * theta_norm
            change = actual[name][:, column]
            ratio = np.nanmedian(change / np.where(predicted != 0, predicted, np.nan))
            print(f"| {name} | {fraction:.0e} | {np.median(predicted):+.2e} | {np.median(change):+.2e} | "
                  f"{ratio:+.2f} | {np.mean(change < 0):.0%} |")

if __name__ == "__main__":
    main()
