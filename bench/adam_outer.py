"""A reference ceiling: the same learned optimizer meta-trained by Adam.

Not self-training and never imported by ``selfloop``: one lopt θ (random
initialization, ``--seed``) is meta-trained by optax Adam from the very meta-
gradients a run's member gets (same lopt, estimator, task distribution, K and
work units on the same farm), with ``--tasks`` persistent inner problems per
outer step. It is scored on the run config's held-out set every ``--every``
seconds of training (evaluation time not counted), so every self-training
result can be read against what the architecture reaches under a
hand-designed outer optimizer with the same compute.

    python bench/adam_outer.py --minutes 15 --tasks 20 --set "lopt.features='relative'" --set lopt.odd=true
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax

from selfloop.config import load_config
from selfloop.evaluation.heldout import adam_reference, evaluate_members
from selfloop.farm.engines import LocalFarm
from selfloop.farm.units import UnitResult, WorkUnit, initial_slot, run_unit
from selfloop.lopt import make_lopt
from selfloop.master.population import context_for, mean_gradient
from selfloop.tasks.sampler import heldout_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML changes to the default config (default: none)")
    parser.add_argument("--set", action="append", default=[], help="section.key=value, as for run.py")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time (evaluations not counted)")
    parser.add_argument("--every", type=float, default=120.0, help="seconds of training between evaluations")
    parser.add_argument("--tasks", type=int, default=2, help="inner problems per outer step (a member has 2)")
    parser.add_argument("--truncation", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="checkpoints/jax_cache")
    args = parser.parse_args()
    config = load_config(args.config, tuple(args.set))
    context = context_for(config)
    lopt = make_lopt(config.lopt)
    theta = jax.tree_util.tree_map(np.asarray, lopt.init_theta(jax.random.PRNGKey(args.seed)))
    outer = optax.adam(args.learning_rate)
    outer_state = outer.init(theta)
    slots = [initial_slot(context, 0, s, theta) for s in range(args.tasks)]
    cfg = config.eval
    specs = heldout_tasks(cfg.tasks, config.tasks.families, cfg.seed)
    farm = LocalFarm(cache_root=args.cache)
    farm.wait_ready()
    cache_dir = Path(tempfile.gettempdir()) / "selfloop-adam-outer"
    print(f"Adam (lr {args.learning_rate}) meta-trains one {config.lopt.arch} lopt ({config.lopt.features}"
          f"{', odd' if config.lopt.odd else ''}) on {args.tasks} inner problems x K={args.truncation}, "
          f"{config.estimator.pairs} pairs")
    print("| training min | outer steps | inner M | held-out |\n|---|---|---|---|")
    try:
        reference = adam_reference(specs, cfg.steps, cfg.chunk, farm.map, cache_dir)
        trained, inner_steps, step, next_eval = 0.0, 0, 0, 0.0
        while True:
            if trained >= next_eval:
                score = evaluate_members(farm.map, config.lopt, [theta], specs, cfg.steps, cfg.chunk, reference)
                print(f"| {trained / 60:.1f} | {step} | {inner_steps / 1e6:.2f} | {score.members[0]:.3f} |",
                      flush=True)
                next_eval += args.every
            if trained >= 60.0 * args.minutes:
                break
            started = time.perf_counter()
            units = [WorkUnit(step, 0, s, theta, spec, state, args.truncation) for s, (spec, state) in enumerate(slots)]
            outcomes = farm.map(functools.partial(run_unit, context), units)
            results = [r for r in outcomes if isinstance(r, UnitResult)]  # a failed unit's slot waits
            for r in results:
                slots[r.slot] = (r.spec, r.state)
            if not results:
                continue
            updates, outer_state = outer.update(mean_gradient([r.gradient for r in results]), outer_state, theta)
            theta = jax.tree_util.tree_map(np.asarray, optax.apply_updates(theta, updates))
            inner_steps += 2 * config.estimator.pairs * args.truncation * len(results)
            step += 1
            trained += time.perf_counter() - started
    finally:
        farm.close()


if __name__ == "__main__":
    main()
