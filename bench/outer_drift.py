"""Does an outer optimizer move a trained learned optimizer with no signal?

The systematic, signal-free direction of issue #16: a trained θ (the run's PBT
champion, or its best member where it keeps none) is stepped by
its run's own outer optimizer (the lopt of member ``outer_index``, with the
outer state the run kept for θ) for ``--steps`` outer steps fed a meta-gradient
that carries no information, through the very outer step a run takes (rails
and time clamp included), and scored on the run's held-out set before and
after. Two feeds:

- ``zero``: ĝ = 0 at every step;
- ``noise``: ĝ ~ N(0, s²) drawn afresh every step, s per tensor the size of
  the gradients the outer state has seen (relative features) or 1 (per-tensor
  features, which are scale-free).

An optimizer without drift changes the held-out loss by no more than a random
walk does: ``--controls`` rows move θ by the same distance as the noise feed
did, each in its own random direction. Their spread is the bench's resolution:
how much moving that far changes the score of this θ whatever the direction.

``--outer-state fresh`` feeds the same signals to an outer state with no
history (zero momenta and second moments; the run's step count, so the time
features match): what the outer optimizer does with no signal by itself,
apart from the momentum it carries from the meta-gradients it was given.

``--clocks 0,300,1000,2000,10000`` asks instead how long a step each member's
outer optimizer proposes under the noise feed when its outer state's step count
(the clock its time features read) is set to each value: the step-length
schedule it learned on inner problems, as it applies to the outer problem. It
prints one row per member (the proposal ‖Δθ‖/‖θ‖ times the outer step
multiplier, before the rail and the member's PBT step scale, averaged over
``--trials`` draws) and evaluates nothing.

    python bench/outer_drift.py checkpoints/default --steps 220 --controls 4
    python bench/outer_drift.py checkpoints/default --clocks 0,100,300,1000,2000,3000,10000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from selfloop.config import ConfigError
from selfloop.evaluation.heldout import adam_reference, evaluate_members
from selfloop.export import choose_member
from selfloop.farm.engines import LocalFarm
from selfloop.lopt import make_lopt
from selfloop.lopt.base import tree_l2_norm
from selfloop.master.population import outer_settings, outer_step_fn, outer_time_limit
from selfloop.state import Snapshot, snapshot
from selfloop.store.checkpoint import list_checkpoints, read_checkpoint, saved_config
from selfloop.tasks.sampler import heldout_tasks


def noise_scales(outer_state, theta):
    """Per-tensor size of the gradients the outer state has seen (1 where it keeps none)."""
    if not hasattr(outer_state, "grad_scale"):
        return jax.tree_util.tree_map(lambda t: 1.0, theta)
    weight = max(float(outer_state.scale_weight), 1e-12)
    return jax.tree_util.tree_map(lambda r: max(float(r) / weight, 1e-30), outer_state.grad_scale)


def feed(kind: str, theta, scales, key):
    leaves, treedef = jax.tree_util.tree_flatten(theta)
    if kind == "zero":
        return jax.tree_util.tree_map(jnp.zeros_like, theta)
    keys = jax.random.split(key, len(leaves))
    scale_leaves = treedef.flatten_up_to(scales)
    noise = [s * jax.random.normal(k, x.shape) for k, x, s in zip(keys, leaves, scale_leaves)]
    return jax.tree_util.tree_unflatten(treedef, noise)


def drift(config, outer_theta, theta, outer_state, step_scale: float, kind: str, steps: int, seed: int):
    """θ after ``steps`` outer steps fed ``kind``; and the fraction the rail shortened."""
    step_fn = outer_step_fn(make_lopt(config.lopt))
    scales = noise_scales(outer_state, theta)
    key = jax.random.PRNGKey(seed)
    shortened = 0
    for _ in range(steps):
        key, sub = jax.random.split(key)
        out = step_fn(outer_theta, theta, feed(kind, theta, scales, sub), outer_state, jnp.float32(0.5),
                      jnp.float32(step_scale), outer_settings(config))
        theta, outer_state = out.theta, out.state
        shortened += int(out.shortened)
    return theta, shortened / steps


def fresh_outer_state(lopt, theta, kept_state):
    """An outer state with no history but the kept state's step count."""
    return lopt.init_state(theta)._replace(step=kept_state.step)


def proposals_by_clock(config, state, clocks: list[int], trials: int, seed: int) -> np.ndarray:
    """[member, clock]: the mean ‖Δθ‖/‖θ‖ (times the outer step multiplier)
    that the member's outer optimizer proposes for one noise-fed step from
    its kept outer state, with that state's clock set to each of ``clocks``."""
    step_fn = outer_step_fn(make_lopt(config.lopt))
    settings = outer_settings(config)._replace(max_step_ratio=jnp.float32(0.0), time_limit=jnp.int32(0))
    key = jax.random.PRNGKey(seed)
    proposals = np.zeros((len(state.members), len(clocks)))
    for i, member in enumerate(state.members):
        outer_theta = state.members[member.outer_index].theta
        scales = noise_scales(member.outer_state, member.theta)
        for _ in range(trials):
            key, sub = jax.random.split(key)
            gradient = feed("noise", member.theta, scales, sub)
            for j, clock in enumerate(clocks):
                outer_state = member.outer_state._replace(step=jnp.int32(clock))
                out = step_fn(outer_theta, member.theta, gradient, outer_state, jnp.float32(0.5),
                              jnp.float32(1.0), settings)
                proposals[i, j] += float(out.step_ratio) / trials
    return proposals


def print_clock_table(state, clocks: list[int], proposals: np.ndarray) -> None:
    print("| member | its clock | PBT step scale | " + " | ".join(f"clock {c}" for c in clocks) + " |")
    print("|---" * (3 + len(clocks)) + "|")
    for i, (member, row) in enumerate(zip(state.members, proposals)):
        cells = " | ".join(f"{100 * r:.3f} %" for r in row)
        print(f"| m{i} | {int(member.outer_state.step)} | {member.step_scale:.2f} | {cells} |")
    medians = " | ".join(f"**{100 * r:.3f} %**" for r in np.median(proposals, axis=0))
    print(f"| median | | | {medians} |")


def measured_snapshot(state) -> tuple[Snapshot, str]:
    """The PBT champion; without one (``pbt.champion`` off), the member best at
    the last held-out evaluation, as ``run.py export --member best`` picks it."""
    if state.champion is not None:
        return state.champion, f"the champion, from member {state.champion.source}"
    try:
        best = choose_member(state, "best")
    except ConfigError as error:
        raise SystemExit(f"no PBT champion and {error}") from None
    return snapshot(state.members[best]), f"member {best}, the best at the last held-out evaluation"


def subject_theta(run_dir: Path, random_theta: bool):
    """(newest checkpoint, its config, θ as host arrays, what θ is): the run's
    measured snapshot, or with ``random_theta`` a fixed random initialization
    of the run's lopt."""
    paths = list_checkpoints(run_dir)
    if not paths:
        raise SystemExit(f"{run_dir}: no checkpoint-*.h5")
    config = saved_config(paths[0])
    if random_theta:
        theta, which = make_lopt(config.lopt).init_theta(jax.random.PRNGKey(123)), "a random initialization"
    else:
        subject, which = measured_snapshot(read_checkpoint(paths[0], config))
        theta = subject.theta
    return paths[0], config, jax.tree_util.tree_map(np.asarray, theta), which


def random_walk(theta, distance: float, seed: int):
    """θ moved by ``distance`` in a uniformly random direction."""
    leaves, treedef = jax.tree_util.tree_flatten(theta)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    direction = [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    norm = float(tree_l2_norm(direction))
    return jax.tree_util.tree_unflatten(treedef, [x + distance / norm * d for x, d in zip(leaves, direction)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=220)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--controls", type=int, default=4, help="random directions of the noise feed's length")
    parser.add_argument("--outer-state", choices=("run", "fresh"), default="run",
                        help="the outer state the run kept, or one with no history")
    parser.add_argument("--cache", default="checkpoints/jax_cache")
    parser.add_argument("--clocks", default="", help="comma-separated outer step counts: the schedule table only")
    parser.add_argument("--trials", type=int, default=4, help="noise draws per member (--clocks)")
    args = parser.parse_args()
    paths = list_checkpoints(args.run_dir)
    if not paths:
        raise SystemExit(f"{args.run_dir}: no checkpoint-*.h5")
    config = saved_config(paths[0])
    state = read_checkpoint(paths[0], config)
    if args.clocks:
        clocks = [int(c) for c in args.clocks.split(",")]
        print(f"{paths[0]}: outer step multiplier {config.population.outer_step_mult}, "
              f"clock clamped at {outer_time_limit(config)} in a run; {args.trials} noise draws")
        print_clock_table(state, clocks, proposals_by_clock(config, state, clocks, args.trials, args.seed))
        return
    subject, which = measured_snapshot(state)
    outer_theta = state.members[subject.outer_index].theta
    print(f"{paths[0]}: {which}, trained by member {subject.outer_index}; "
          f"lopt {config.lopt}; {args.steps} outer steps, step rail {config.population.max_step_ratio}, "
          f"outer step multiplier {config.population.outer_step_mult}")

    outer_state = subject.outer_state
    if args.outer_state == "fresh":
        outer_state = fresh_outer_state(make_lopt(config.lopt), subject.theta, outer_state)
    theta_norm = float(tree_l2_norm(subject.theta))
    thetas, rows = [subject.theta], [f"start ({which}), outer state: {args.outer_state}"]
    feeds = ("zero", "noise")  # rows 1 and 2; the random directions follow
    for kind in feeds:
        theta, shortened = drift(config, outer_theta, subject.theta, outer_state, subject.step_scale,
                                 kind, args.steps, args.seed)
        moved = float(tree_l2_norm(jax.tree_util.tree_map(jnp.subtract, theta, subject.theta)))
        thetas.append(theta)
        rows.append(f"ĝ = {kind}: moved {moved:.3f} ({moved / theta_norm:.2%} of ‖θ‖), "
                    f"rail shortened {shortened:.0%}")
    for control in range(args.controls):
        thetas.append(random_walk(subject.theta, moved, args.seed + 1 + control))
        rows.append(f"random direction {control + 1}, moved {moved:.3f}")

    farm = LocalFarm(cache_root=args.cache)
    farm.wait_ready()
    try:
        cfg = config.eval
        specs = heldout_tasks(cfg.tasks, config.tasks.families, cfg.seed)
        reference = adam_reference(specs, cfg.steps, cfg.chunk, farm.map, args.run_dir)
        result = evaluate_members(farm.map, config.lopt, thetas, specs, cfg.steps, cfg.chunk, reference)
    finally:
        farm.close()
    print(f"\nheld-out: {len(specs)} tasks x {cfg.steps} steps; best fixed-rate Adam {result.best_fixed_adam:.3f}")
    print("| θ | held-out | change |\n|---|---|---|")
    start = result.members[0]
    for row, score in zip(rows, result.members):
        print(f"| {row} | {score:.3f} | {score - start:+.3f} |")
    noise_change = result.members[feeds.index("noise") + 1] - start
    controls = [score - start for score in result.members[1 + len(feeds):]]
    if controls:
        mean = sum(controls) / len(controls)
        print(f"\nrandom directions: change {mean:+.3f} on average, {min(controls):+.3f} to {max(controls):+.3f}; "
              f"the noise feed's excess over their mean {noise_change - mean:+.3f}")


if __name__ == "__main__":
    main()
