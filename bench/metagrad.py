"""How much signal does one outer step's meta-gradient carry?

At a fixed θ (a run's PBT champion, or a random initialization), many fresh
training tasks each give one meta-gradient estimate, exactly as a work unit
makes it: ``--segments`` consecutive truncations of K steps of the task with
P antithetic pairs, the estimate of the last one kept (so ES carries its state
and PES its accumulator mid-episode, as in a run). A meta-batch of B such
estimates is what one outer step of a member with B inner problems averages.

For each setting it prints, over disjoint meta-batches:

- ``cos(indep)``: the cosine between two independent meta-batch estimates
  (both unbiased, so its mean is ‖g‖² / (‖g‖² + noise/B));
- ``cos(ref)``: the cosine between one meta-batch and the mean of every
  other estimate of that setting (the large-sample reference);
- ``B for 0.5``: the meta-batch at which two independent estimates would
  agree with cosine 0.5, from the noise-to-signal ratio r that cos(indep)
  implies at that B (cos = 1 / (1 + r/B));
- ``cos(indep), unit``: as cos(indep), with every task's estimate scaled to
  unit length before the meta-batch averages them, so that no single task's
  scale dominates the step;
- and before those rows, from all pairs of distinct tasks at once (far less
  noisy than the few pairs of disjoint batches): m, the mean cosine between
  two tasks' unit estimates (± its jackknife standard error over tasks), and
  the agreement B·m / (1 + (B − 1)·m) it implies for meta-batches of 2 (the
  default's tasks per member) and 8.

``--kinds grad`` measures the backpropagated gradient (P does not apply;
its estimates are unit length already). ``--optimizer FILE`` takes θ from
an exported optimizer instead of a run's champion.

For random directions in θ's dimension n (1,890 for the default MLP lopt,
1,762 without adaptive features) a cosine has a standard deviation of about
1/sqrt(n) = 0.023-0.024: values within that of 0 mean no signal was detected.

    python bench/metagrad.py checkpoints/default --tasks 64
    python bench/metagrad.py --optimizer selfloop/pretrained/default.h5 --kinds grad,es --truncations 20
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path

import jax
import numpy as np

from selfloop.config import load_config
from selfloop.estimators import estimate_gradient, needs_reset, new_slot
from selfloop.farm.engines import LocalFarm
from selfloop.farm.units import slot_task
from selfloop.lopt import make_lopt
from selfloop.master.population import context_for
from selfloop.store.checkpoint import list_checkpoints, read_checkpoint, saved_config
from selfloop.store.optimizer import load_theta


def task_gradient(context, theta, truncation: int, segments: int, task_index: int) -> np.ndarray:
    """The last of ``segments`` meta-gradient estimates on fresh task ``task_index``, flattened."""
    lopt = make_lopt(context.lopt)
    spec = slot_task(context, 10_000 + task_index, 0, 0)
    slot = new_slot(lopt, spec, theta, context.estimator, context.horizon)
    key = jax.random.fold_in(jax.random.PRNGKey(context.seed), task_index)
    for segment in range(segments):
        if needs_reset(slot):
            break
        estimate = estimate_gradient(lopt, theta, spec, slot, truncation, context.estimator, context.horizon,
                                     jax.random.fold_in(key, segment))
        slot = estimate.slot
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(estimate.gradient)])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def agreement(gradients: np.ndarray, batch: int) -> tuple[float, float]:
    """(mean cos between independent B-batches, mean cos of a B-batch with the rest's mean)."""
    usable = len(gradients) // (2 * batch) * 2 * batch
    batches = gradients[:usable].reshape(-1, batch, gradients.shape[1]).mean(axis=1)
    total = gradients.sum(axis=0)
    independent = [cosine(batches[i], batches[i + 1]) for i in range(0, len(batches) - 1, 2)]
    to_reference = [cosine(b, (total - b * batch) / (len(gradients) - batch)) for b in batches]
    return float(np.mean(independent)), float(np.mean(to_reference))


def pairwise_agreement(unit: np.ndarray) -> tuple[float, float]:
    """m, the mean cosine over all pairs of distinct tasks (rows of unit length),
    and its jackknife standard error over tasks. m estimates ‖E u‖², so a
    meta-batch of B unit estimates agrees with an independent one at about
    B·m / (1 + (B − 1)·m): one number from all n(n−1)/2 pairs, where
    ``agreement`` has only n/(2B) pairs of batches."""
    n = len(unit)
    total = unit.sum(axis=0)
    mean = (total @ total - n) / (n * (n - 1))
    leave_one_out = [((total - u) @ (total - u) - (n - 1)) / ((n - 1) * (n - 2)) for u in unit]
    spread = np.asarray(leave_one_out) - np.mean(leave_one_out)
    return float(mean), float(np.sqrt((n - 1) / n * np.sum(spread**2)))


def batch_agreement(pairwise: float, batch: int) -> float:
    return batch * pairwise / (1.0 + (batch - 1) * pairwise)


def batch_for_half(cos_independent: float, batch: int) -> float:
    """B = r, the noise-to-signal ratio of one estimate, where cos = 1 / (1 + r/B) is 0.5."""
    if cos_independent <= 0:
        return float("inf")
    return batch * (1.0 / cos_independent - 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="a run: its champion θ and its config")
    parser.add_argument("--optimizer", type=Path,
                        help="an exported optimizer file instead of a run: its θ, the default config")
    parser.add_argument("--tasks", type=int, default=64, help="fresh tasks (estimates) per setting")
    parser.add_argument("--segments", type=int, default=3)
    parser.add_argument("--truncations", default="40")
    parser.add_argument("--pairs", default="4")
    parser.add_argument("--kinds", default="es")
    parser.add_argument("--random-theta", action="store_true", help="a random initialization instead of the champion")
    parser.add_argument("--cache", default="checkpoints/jax_cache")
    args = parser.parse_args()
    if (args.run_dir is None) == (args.optimizer is None):
        parser.error("give a run directory or --optimizer FILE")
    if args.optimizer is not None:
        path = args.optimizer
        lopt_config, champion = load_theta(path)
        config = dataclasses.replace(load_config(None), lopt=lopt_config)
    else:
        path = list_checkpoints(args.run_dir)[0]
        config = saved_config(path)
        champion = read_checkpoint(path, config).champion.theta
    theta = make_lopt(config.lopt).init_theta(jax.random.PRNGKey(123)) if args.random_theta else champion
    theta = jax.tree_util.tree_map(np.asarray, theta)
    print(f"{path}: {'random θ' if args.random_theta else 'trained θ'}, lopt {config.lopt.features}"
          f"{' odd' if config.lopt.odd else ''}; {args.tasks} fresh tasks per setting, estimate of segment "
          f"{args.segments}")
    print("| kind | K | P | B (tasks/step) | pairs/step | cos(indep) | cos(ref) | B for cos 0.5 | cos(indep), unit "
          "| s per task |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    farm = LocalFarm(cache_root=args.cache)
    farm.wait_ready()
    try:
        for kind in args.kinds.split(","):
            for truncation in map(int, args.truncations.split(",")):
                for pairs in map(int, args.pairs.split(",")):
                    estimator = dataclasses.replace(config.estimator, kind=kind, pairs=pairs)
                    context = dataclasses.replace(context_for(config), estimator=estimator)
                    fn = functools.partial(task_gradient, context, theta, truncation, args.segments)
                    start = time.perf_counter()
                    gradients = np.stack(farm.map(fn, list(range(args.tasks))))
                    seconds = time.perf_counter() - start
                    unit = gradients / np.maximum(np.linalg.norm(gradients, axis=1, keepdims=True), 1e-30)
                    pairwise, error = pairwise_agreement(unit)
                    print(f"| {kind} | {truncation} | {pairs} | all pairs, unit: m = {pairwise:.4f} ± {error:.4f} "
                          f"| B = 2: {batch_agreement(pairwise, 2):.3f} | B = 8: {batch_agreement(pairwise, 8):.3f} "
                          f"| | | | |", flush=True)
                    for batch in (1, 2, 4, 8, 16):
                        if 2 * batch > len(gradients):
                            break
                        independent, reference = agreement(gradients, batch)
                        print(f"| {kind} | {truncation} | {pairs} | {batch} | {batch * pairs} | {independent:.3f} | "
                              f"{reference:.3f} | {batch_for_half(independent, batch):.0f} | "
                              f"{agreement(unit, batch)[0]:.3f} | "
                              f"{seconds / args.tasks:.2f} |", flush=True)
    finally:
        farm.close()


if __name__ == "__main__":
    main()
