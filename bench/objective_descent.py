"""Is a step down the training objective a step down on the held-out set?

At a run's measured θ (its PBT champion, or its best member where it keeps
none), each objective setting's meta-gradient is averaged over ``--tasks``
fresh training tasks, exactly as a work unit makes it (backpropagated,
``estimator.kind = "grad"``): the direction an outer optimizer is pushed
along, with the tasks' disagreement averaged out. θ is then moved against each
mean direction by ``--distances`` (fractions of ‖θ‖) and scored, as the
held-out set scores optimizers, on the run's held-out set and on the
training tasks the gradients came from, beside random directions of the
largest distance (the bench's resolution: what moving that far costs
whatever the direction). ``--random-theta`` takes a random initialization
instead: a point where the descent must show.

A setting is ``K:segment[:WEIGHT]``: truncation K, the episode's
``segment``-th truncation (1 starts at the task's initialization, as the
held-out set's curves do), and optionally ``estimator.grad_weight`` (
``meta_loss``, or ``none``: as backpropagated, clipped at ``--outlier-clip``
times the median length as a run's ``estimator.outlier_clip`` would). A
run's estimates are mostly of segments well inside 200-2,000-step episodes.
If the held-out score rose along those means and fell along the first
segment's, the objective would be leading a run uphill; if it rises along
every one even on the gradients' own tasks, θ is at a minimum of what both
measure, with steep directions.

It prints, per setting, m (the mean cosine over pairs of tasks' unit
estimates, so the mean's length is about √m) and the change of the score at
each distance on both task sets, the held-out change by family at the
largest distance, and the cosines between the settings' mean directions.

    python bench/objective_descent.py checkpoints/default --settings 300:1,40:3,40:10 --tasks 32
    python bench/objective_descent.py checkpoints/default --settings 300:1,300:1:none --distances 0.003,0.01
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from jax.flatten_util import ravel_pytree
from metagrad import cosine, estimates, fresh_task, pairwise_agreement, unit_rows
from outer_drift import random_walk, subject_theta

from selfloop.estimators import clip_outliers
from selfloop.evaluation.heldout import adam_reference, heldout_task_scores
from selfloop.farm.engines import LocalFarm
from selfloop.lopt.base import tree_l2_norm
from selfloop.master.population import context_for
from selfloop.tasks.sampler import heldout_tasks


@dataclasses.dataclass(frozen=True)
class Setting:
    truncation: int
    segment: int
    weight: str  # estimator.grad_weight

    @classmethod
    def parse(cls, text: str) -> Setting:
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("meta_loss", "none")):
            raise SystemExit(f"--settings: {text!r} is not K:segment or K:segment:WEIGHT (meta_loss or none)")
        return cls(int(parts[0]), int(parts[1]), parts[2] if len(parts) == 3 else "unit")

    def __str__(self) -> str:
        weight = {"unit": "", "meta_loss": ", weighted by meta-loss", "none": ", as backpropagated"}[self.weight]
        return f"K = {self.truncation}, segment {self.segment}{weight}"


def moved_against(theta, direction: np.ndarray, distance: float):
    """θ − distance · direction / ‖direction‖ (``direction`` flattened in leaf order)."""
    flat, unflatten = ravel_pytree(theta)
    return unflatten(flat - distance * direction / max(np.linalg.norm(direction), 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--settings", default="80:1,40:3,40:10", help="K:segment[:meta_loss|none], comma-separated")
    parser.add_argument("--tasks", type=int, default=32, help="fresh training tasks per setting")
    parser.add_argument("--distances", default="0.01,0.03", help="fractions of ‖θ‖, comma-separated")
    parser.add_argument("--controls", type=int, default=2, help="random directions at the largest distance")
    parser.add_argument("--outlier-clip", type=float, default=4.0,
                        help="as estimator.outlier_clip, for the settings without unit length (0: off)")
    parser.add_argument("--random-theta", action="store_true",
                        help="a random initialization instead of the run's member: where descent must show")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="checkpoints/jax_cache")
    args = parser.parse_args()
    settings = [Setting.parse(text) for text in args.settings.split(",")]
    fractions = [float(d) for d in args.distances.split(",")]
    path, config, theta, which = subject_theta(args.run_dir, args.random_theta)
    theta_norm = float(tree_l2_norm(theta))
    print(f"{path}: {which}; {args.tasks} fresh training tasks per setting")

    farm = LocalFarm(cache_root=args.cache)
    farm.wait_ready()
    try:
        means, agreements = [], []
        for setting in settings:
            estimator = dataclasses.replace(config.estimator, grad_weight=setting.weight)
            gradients, _ = estimates(farm, dataclasses.replace(config, estimator=estimator), theta, "grad",
                                     setting.truncation, 1, setting.segment, args.tasks)
            if setting.weight == "none":  # as a round's estimates are clipped (estimator.outlier_clip)
                gradients = np.stack(clip_outliers({0: list(gradients)}, args.outlier_clip)[0][0])
            means.append(gradients.mean(axis=0))
            agreements.append(pairwise_agreement(unit_rows(gradients)))
            print(f"{setting}: m = {agreements[-1][0]:.4f} ± {agreements[-1][1]:.4f}", flush=True)
        thetas, rows = [theta], ["start"]
        for setting, mean in zip(settings, means):
            for fraction in fractions:
                thetas.append(moved_against(theta, mean, fraction * theta_norm))
                rows.append((str(setting), fraction))
        for control in range(args.controls):
            thetas.append(random_walk(theta, max(fractions) * theta_norm, args.seed + 1 + control))
            rows.append((f"random direction {control + 1}", max(fractions)))
        cfg = config.eval
        heldout = heldout_tasks(cfg.tasks, config.tasks.families, cfg.seed)
        # The gradients' own training tasks: does the step lower the objective where it was
        # measured, scored as the held-out set is?
        context = context_for(config)
        own = tuple(fresh_task(context, i) for i in range(args.tasks))
        print(f"scoring {len(thetas)} optimizers on {len(heldout)} held-out tasks and on the {len(own)} "
              f"training tasks, {cfg.steps} steps each", flush=True)
        scored = {}
        for name, specs, cache in (("held-out", heldout, args.run_dir), ("own tasks", own, None)):
            reference = adam_reference(specs, cfg.steps, cfg.chunk, farm.map, cache)
            scored[name] = heldout_task_scores(farm.map, config.lopt, thetas, specs, cfg.steps, cfg.chunk,
                                               reference)[0]
    finally:
        farm.close()

    for name, per_task in scored.items():
        print_changes(name, per_task.mean(axis=0), rows, settings, agreements, fractions, args.controls)
    per_task = scored["held-out"]
    families = sorted({spec.family for spec in heldout})
    of_family = {f: np.array([spec.family == f for spec in heldout]) for f in families}
    print(f"\nheld-out change by family, moved {max(fractions):.1%} of ‖θ‖")
    print("| moved against | " + " | ".join(families) + " |\n|---|" + "---|" * len(families))
    for index, row in enumerate(rows[1:], start=1):
        if row[1] != max(fractions):
            continue
        cells = [per_task[of_family[f], index].mean() - per_task[of_family[f], 0].mean() for f in families]
        print(f"| {row[0]} | " + " | ".join(f"{c:+.3f}" for c in cells) + " |")
    print("\ncosines between the settings' mean directions")
    for i, a in enumerate(settings):
        print(f"{a}: " + ", ".join(f"{cosine(means[i], means[j]):+.3f} ({b})"
                                  for j, b in enumerate(settings) if j != i))


def print_changes(name, scores, rows, settings, agreements, fractions, controls) -> None:
    """The change of the mean score from θ's for every moved θ, one row per direction."""
    start = scores[0]
    print(f"\n{name}: {start:.3f} at θ")
    print("| moved against | m (tasks' agreement) | " + " | ".join(f"{f:.1%} of ‖θ‖" for f in fractions) + " |")
    print("|---|---|" + "---|" * len(fractions))
    changes = dict(zip(rows[1:], [score - start for score in scores[1:]]))
    for setting, (m, error) in zip(settings, agreements):
        cells = " | ".join(f"{changes[(str(setting), f)]:+.3f}" for f in fractions)
        print(f"| {setting} | {m:.4f} ± {error:.4f} | {cells} |")
    for control in range(controls):
        label = f"random direction {control + 1}"
        cells = " | ".join(f"{changes[(label, f)]:+.3f}" if (label, f) in changes else "" for f in fractions)
        print(f"| {label} | | {cells} |")


if __name__ == "__main__":
    main()
