"""Cost of one inner step: the MLP (relative, adaptive) and hierarchical lopts vs optax Adam, same task.

Both run through the same compiled program (lax.scan over steps, batch of 1);
only the optimizer differs. Runs are interleaved (lopt, Adam, lopt, Adam, ...)
and the ratio of medians is reported, so machine noise hits both alike.

    python bench/inner_step.py [--steps 2000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from selfloop.config import LOptConfig
from selfloop.estimators import as_inner_optimizer
from selfloop.evaluation.baselines import ADAM
from selfloop.lopt import make_lopt
from selfloop.tasks.base import TaskSpec
from selfloop.unroll import broadcast_batch, task_program

# Three sizes from the task distribution: 10, 1,218 and 2,410 weights.
TASKS = (
    TaskSpec("quadratic", 0, 1, (("log10_cond", 2.0), ("noise", 0.0), ("scale", 1.0))),
    TaskSpec("toy2d", 0, 2, (("activation", 0.0), ("dataset", 0.0), ("noise", 0.1), ("param_scale", 1.0))),
    TaskSpec("digits_mlp", 0, 3, (("activation", 0.0), ("param_scale", 1.0))),
)


def _timed_steps(spec, optimizer, hyper, steps: int, chunk: int) -> float:
    """Seconds per inner step over ``steps`` steps (after the program is warm)."""
    program = task_program(spec.family, spec.bucket, optimizer)
    episode, inner = program.start(spec, 0)
    inners = broadcast_batch(inner, 1)
    start = time.perf_counter()
    for _ in range(steps // chunk):
        inners, episode, losses = program.advance(spec, hyper, inners, episode, chunk)
    jax.block_until_ready(losses)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunk", type=int, default=100)
    args = parser.parse_args()

    configs = {
        "relative": LOptConfig(features="relative"),
        "adaptive": LOptConfig(features="adaptive"),
        "hierarchical": LOptConfig(arch="hierarchical", features="per_tensor", odd=False),
    }
    contenders = {}
    for name, lopt_config in configs.items():
        lopt = make_lopt(lopt_config)
        theta = jax.tree_util.tree_map(lambda x: x[None], lopt.init_theta(jax.random.PRNGKey(0)))
        contenders[name] = (as_inner_optimizer(lopt), theta)
    contenders["adam"] = (ADAM, np.asarray([1e-3], np.float32))
    print(f"jax {jax.__version__}, {os.cpu_count()} cpus, {args.steps} steps x {args.repeats} interleaved repeats; "
          "us per inner step (median), then each lopt's time over Adam's and over the relative mlp's")
    lopts = list(configs)
    print(f"{'task':<14}{'weights':>8}" + "".join(f"{name:>14}" for name in contenders)
          + "".join(f"{name + '/adam':>19}" for name in lopts)
          + "".join(f"{name + '/relative':>23}" for name in lopts[1:]))
    for spec in TASKS:
        program = task_program(spec.family, spec.bucket, ADAM)
        _, inner = program.start(spec, 0)
        weights = sum(x.size for x in jax.tree_util.tree_leaves(inner.params))
        for optimizer, hyper in contenders.values():  # compile outside the timing
            _timed_steps(spec, optimizer, hyper, args.chunk, args.chunk)
        times = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, (optimizer, hyper) in contenders.items():
                times[name].append(_timed_steps(spec, optimizer, hyper, args.steps, args.chunk))
        median = {name: statistics.median(values) * 1e6 for name, values in times.items()}
        print(f"{spec.family:<14}{weights:>8,}" + "".join(f"{median[name]:>14.1f}" for name in contenders)
              + "".join(f"{median[name] / median['adam']:>19.2f}" for name in lopts)
              + "".join(f"{median[name] / median['relative']:>23.2f}" for name in lopts[1:]))

if __name__ == "__main__":
    main()
