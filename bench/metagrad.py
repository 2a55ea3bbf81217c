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
an exported optimizer instead of a run's champion (in a run without one,
``pbt.champion = false``, the member best at the last held-out
evaluation). ``--segments 1,2,4``
measures each episode position in turn (segment 1 starts at the task's
initialization). ``--checkpoints N`` walks up to N of the run's kept
checkpoints, oldest first, and prints only m for each, beside the best
member's and the champion's held-out scores at the last evaluation before
it: where along a run the tasks stop agreeing. The tasks are the same at
every checkpoint.

For random directions in θ's dimension n (1,890 for the default MLP lopt,
1,762 without adaptive features) a cosine has a standard deviation of about
1/sqrt(n) = 0.023-0.024: values within that of 0 mean no signal was detected.

    python bench/metagrad.py checkpoints/default --tasks 64
    python bench/metagrad.py --optimizer selfloop/pretrained/default.h5 --kinds grad,es --truncations 20
    python bench/metagrad.py RUN --kinds grad --truncations 20 --segments 1,3 --checkpoints 8 --tasks 48
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path

import jax
import numpy as np
from objective_agreement import spread_checkpoints
from outer_drift import measured_snapshot

from selfloop.config import load_config
from selfloop.estimators import estimate_gradient, needs_reset, new_slot
from selfloop.events import Eval, of_type, read_events
from selfloop.farm.engines import LocalFarm
from selfloop.farm.units import slot_task
from selfloop.lopt import make_lopt
from selfloop.master.population import context_for
from selfloop.store.checkpoint import list_checkpoints, read_checkpoint, saved_config
from selfloop.store.optimizer import load_theta


def fresh_task(context, task_index: int):
    """Fresh training task ``task_index``: a slot of a member no run has (10,000 + index)."""
    return slot_task(context, 10_000 + task_index, 0, 0)


def task_gradient(context, theta, truncation: int, segments: int, task_index: int) -> np.ndarray:
    """The ``segments``-th (the last) meta-gradient estimate on fresh task ``task_index``, flattened."""
    lopt = make_lopt(context.lopt)
    spec = fresh_task(context, task_index)
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


def estimates(farm, config, theta, kind: str, truncation: int, pairs: int, segment: int,
              tasks: int) -> tuple[np.ndarray, float]:
    """One estimate per fresh task at ``theta``, and the seconds per task."""
    estimator = dataclasses.replace(config.estimator, kind=kind, pairs=pairs)
    context = dataclasses.replace(context_for(config), estimator=estimator)
    fn = functools.partial(task_gradient, context, theta, truncation, segment)
    start = time.perf_counter()
    gradients = np.stack(farm.map(fn, list(range(tasks))))
    return gradients, (time.perf_counter() - start) / tasks


def unit_rows(gradients: np.ndarray) -> np.ndarray:
    return gradients / np.maximum(np.linalg.norm(gradients, axis=1, keepdims=True), 1e-30)


def settings(args) -> list[tuple[str, int, int, int]]:
    """(kind, K, P, segment) for every combination the arguments name."""
    return [(kind, truncation, pairs, segment)
            for kind in args.kinds.split(",")
            for truncation in map(int, args.truncations.split(","))
            for pairs in map(int, args.pairs.split(","))
            for segment in map(int, args.segments.split(","))]


def agreement_table(farm, config, theta, args) -> None:
    """m and the disjoint meta-batch agreements for every setting, at one θ."""
    print("| kind | K | P | segment | B (tasks/step) | pairs/step | cos(indep) | cos(ref) | B for cos 0.5 "
          "| cos(indep), unit | s per task |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, truncation, pairs, segment in settings(args):
        gradients, seconds = estimates(farm, config, theta, kind, truncation, pairs, segment, args.tasks)
        unit = unit_rows(gradients)
        pairwise, error = pairwise_agreement(unit)
        head = f"| {kind} | {truncation} | {pairs} | {segment}"
        print(f"{head} | all pairs, unit: m = {pairwise:.4f} ± {error:.4f} "
              f"| B = 2: {batch_agreement(pairwise, 2):.3f} | B = 8: {batch_agreement(pairwise, 8):.3f} "
              f"| | | | |", flush=True)
        for batch in (1, 2, 4, 8, 16):
            if 2 * batch > len(gradients):
                break
            independent, reference = agreement(gradients, batch)
            print(f"{head} | {batch} | {batch * pairs} | {independent:.3f} | {reference:.3f} | "
                  f"{batch_for_half(independent, batch):.0f} | {agreement(unit, batch)[0]:.3f} | "
                  f"{seconds:.2f} |", flush=True)


def measured_theta(state):
    """The champion's θ; without one (``pbt.champion`` off), the member best at
    the last held-out evaluation."""
    if state.champion is None and not any(m.history for m in state.members):
        return state.members[0].theta  # a checkpoint from before the first evaluation
    return measured_snapshot(state)[0].theta


def along_run(farm, run_dir: Path, count: int, args) -> None:
    """m for every setting at the champion (or best member) of each of ``count`` kept checkpoints,
    beside the last held-out evaluation at or before that round."""
    evals = of_type(read_events(run_dir), Eval)
    columns = settings(args)
    print("| round | minute | best member held-out | champion held-out | "
          + " | ".join(f"m: {kind} K = {k} segment {segment}" for kind, k, _, segment in columns) + " |")
    print("|---|---|---|---|" + "---|" * len(columns))
    for path in spread_checkpoints(run_dir, count, min_round=0):
        config = saved_config(path)
        state = read_checkpoint(path, config)
        theta = jax.tree_util.tree_map(np.asarray, measured_theta(state))
        before = [e for e in evals if e.round <= state.round]
        seen = before[-1] if before else None
        held = "- | - | -" if seen is None else (
            f"{seen.elapsed / 60:.1f} | {seen.best:.3f} | "
            + ("-" if seen.champion is None else f"{seen.champion:.3f}"))
        cells = []
        for kind, truncation, pairs, segment in columns:
            gradients, _ = estimates(farm, config, theta, kind, truncation, pairs, segment, args.tasks)
            cells.append("{:.4f} ± {:.4f}".format(*pairwise_agreement(unit_rows(gradients))))
        print(f"| {state.round} | {held} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="a run: its champion θ and its config")
    parser.add_argument("--optimizer", type=Path,
                        help="an exported optimizer file instead of a run: its θ, the default config")
    parser.add_argument("--tasks", type=int, default=64, help="fresh tasks (estimates) per setting")
    parser.add_argument("--segments", default="3", help="episode positions, comma-separated (1: the first K steps)")
    parser.add_argument("--truncations", default="40")
    parser.add_argument("--pairs", default="4")
    parser.add_argument("--kinds", default="es")
    parser.add_argument("--random-theta", action="store_true", help="a random initialization instead of the champion")
    parser.add_argument("--checkpoints", type=int, default=0,
                        help="walk up to this many of the run's kept checkpoints (m only)")
    parser.add_argument("--cache", default="checkpoints/jax_cache")
    args = parser.parse_args()
    if (args.run_dir is None) == (args.optimizer is None):
        parser.error("give a run directory or --optimizer FILE")
    if args.checkpoints and args.run_dir is None:
        parser.error("--checkpoints walks a run directory")
    farm = LocalFarm(cache_root=args.cache)
    farm.wait_ready()
    try:
        if args.checkpoints:
            print(f"{args.run_dir}: the champion (or best member) of each checkpoint; "
                  f"{args.tasks} fresh tasks per setting")
            along_run(farm, args.run_dir, args.checkpoints, args)
            return
        if args.optimizer is not None:
            path = args.optimizer
            lopt_config, trained = load_theta(path)
            config = dataclasses.replace(load_config(None), lopt=lopt_config)
        else:
            path = list_checkpoints(args.run_dir)[0]
            config = saved_config(path)
            trained = measured_theta(read_checkpoint(path, config))
        theta = make_lopt(config.lopt).init_theta(jax.random.PRNGKey(123)) if args.random_theta else trained
        theta = jax.tree_util.tree_map(np.asarray, theta)
        print(f"{path}: {'random θ' if args.random_theta else 'trained θ'}, lopt {config.lopt.features}"
              f"{' odd' if config.lopt.odd else ''}; {args.tasks} fresh tasks per setting")
        agreement_table(farm, config, theta, args)
    finally:
        farm.close()


if __name__ == "__main__":
    main()
