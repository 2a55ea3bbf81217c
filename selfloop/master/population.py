"""The self-training population (Metz et al. 2021, "Training Learned Optimizers
with Randomly Initialized Learned Optimizers").

Member i holds lopt weights θ_i, the index o(i) of the member whose lopt is its
outer optimizer, the per-weight state that lopt keeps for θ_i, a truncation
length K_i and its persistent inner problems. One outer step of member i:
θ_i, state_i <- lopt.update(θ_{o(i)}, θ_i, ĝ_i, state_i). That is the only
way θ ever changes; no hand-designed optimizer exists on this path.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from selfloop.config import Config, PopulationConfig
from selfloop.farm.units import UnitContext, initial_slot
from selfloop.lopt import LearnedOptimizer, make_lopt
from selfloop.lopt.base import tree_all_finite, tree_l2_norm
from selfloop.state import Member, Slot


class OuterStep(NamedTuple):
    theta: Any
    state: Any
    accepted: jax.Array  # bool []: False when the step would leave θ non-finite
    step_ratio: jax.Array  # float32 []: ‖Δθ‖/‖θ‖ as proposed (times the step multiplier), before the rail
    shortened: jax.Array  # bool []: whether the step-size rail shortened it
    gradient_norm: jax.Array  # float32 []: ‖ĝ‖ as the outer optimizer read it


class OuterSettings(NamedTuple):
    """The run's fixed settings of every outer step (scalars, traced)."""

    step_mult: jax.Array | float  # float32 []: the lopt's step, acting as an outer optimizer, times this
    max_step_ratio: jax.Array | float  # float32 []: the rail (0: none)
    time_limit: jax.Array | int  # int32 []: the outer state's step count stops here (0: never)


def outer_time_limit(config: Config) -> int:
    """The step count at which outer optimizers' time stops (0: never)."""
    return config.tasks.horizon_max if config.population.clamp_outer_time else 0


def outer_settings(config: Config) -> OuterSettings:
    population = config.population
    return OuterSettings(jnp.float32(population.outer_step_mult), jnp.float32(population.max_step_ratio),
                         jnp.int32(outer_time_limit(config)))


def context_for(config: Config) -> UnitContext:
    return UnitContext(seed=config.run.seed, lopt=config.lopt, estimator=config.estimator, tasks=config.tasks)


def meta_batch_tasks(population: PopulationConfig, workers: int) -> int:
    """Tasks in each member's meta-batch on a farm of ``workers``.

    A round's units run in ceil(units / workers) waves whatever the farm, so
    the waves that ``tasks_per_member`` tasks per member need have room for
    floor(waves * workers / size) tasks per member at no more wall time a
    round (units differ in length, so this is the packing's bound, not a
    promise): with ``fill_farm`` a big farm gives every outer step a better
    meta-gradient, not only more rounds, and a small one keeps the minimum."""
    least = population.tasks_per_member
    if not population.fill_farm or workers < 1:
        return least
    waves = math.ceil(population.size * least / workers)
    return max(least, waves * workers // population.size)


def resize_meta_batches(members: list[Member], tasks: int, context: UnitContext) -> int:
    """Give every member ``tasks`` persistent inner problems: slots beyond it
    are dropped (their episodes end), missing ones start their first episode
    on a fresh task under the member's θ. Returns the count before (the
    largest any member had)."""
    before = max(len(m.slots) for m in members)
    for i, member in enumerate(members):
        del member.slots[tasks:]
        member.slots += [Slot(*initial_slot(context, i, s, member.theta)) for s in range(len(member.slots), tasks)]
    return before


def init_population(config: Config, tasks: int | None = None) -> list[Member]:
    """Random lopt weights, random outer optimizers, random truncations;
    ``tasks`` inner problems each (default ``population.tasks_per_member``)."""
    lopt = make_lopt(config.lopt)
    context = context_for(config)
    rng = np.random.default_rng([config.run.seed, 0x9091])
    keys = jax.random.split(jax.random.PRNGKey(config.run.seed), config.population.size)
    members = []
    for key in keys:
        theta = lopt.init_theta(key)
        members.append(
            Member(
                theta=theta,
                outer_state=lopt.init_state(theta),
                outer_index=int(rng.integers(config.population.size)),
                truncation=int(rng.choice(config.population.truncations)),
                slots=[],
            )
        )
    resize_meta_batches(members, tasks or config.population.tasks_per_member, context)
    return members


def redraw_unlisted_truncations(members: list[Member], truncations: tuple[int, ...],
                                rng: np.random.Generator) -> dict[int, tuple[int, int]]:
    """Give every member whose K is not in ``truncations`` a K drawn from them,
    as PBT's explore step would; {member: (old K, new K)} for those redrawn.

    A run resumed with another ``population.truncations`` trains on the lengths
    it was given from its next round, not only as PBT happens to redraw them."""
    redrawn = {}
    for i, member in enumerate(members):
        if member.truncation not in truncations:
            old, member.truncation = member.truncation, int(rng.choice(truncations))
            redrawn[i] = (old, member.truncation)
    return redrawn


@functools.cache
def outer_step_fn(lopt: LearnedOptimizer):
    """Jitted outer update for ``lopt``: the lopt's own update rule, its step
    times the run's fixed ``settings.step_mult`` (the lopt's step size for the
    outer problem, as ``lopt.step_mult`` is for inner ones), with two safety
    rails that never replace it: a non-finite result is rejected, and a step
    longer than ``max_step_ratio``·‖θ‖ is shortened (0 disables). The state's
    step count stops at ``time_limit`` (0: never), so the outer optimizer's
    time features stay where it learned them. The step, once within the
    rail, is multiplied by the member's ``step_scale`` (at most 1, explored
    by PBT): where the rail binds, the scale still sets the length, so
    selection can shorten (anneal) it."""

    @jax.jit
    def outer_step(outer_theta, theta, gradient, state, meta_loss, step_scale,
                   settings: OuterSettings) -> OuterStep:
        gradient = jax.tree_util.tree_map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), gradient)
        # The member's meta-loss is the "training loss" of θ (read by the hierarchical lopt).
        proposed, new_state = lopt.update(outer_theta, theta, gradient, state, meta_loss)
        time_limit, max_step_ratio = settings.time_limit, settings.max_step_ratio
        new_state = new_state._replace(
            step=jnp.where(time_limit > 0, jnp.minimum(new_state.step, time_limit), new_state.step)
        )
        delta = jax.tree_util.tree_map(lambda p, t: settings.step_mult * (p - t), proposed, theta)
        theta_norm = tree_l2_norm(theta)
        ratio = tree_l2_norm(delta) / jnp.maximum(theta_norm, 1e-12)
        shortened = (max_step_ratio > 0) & (ratio > max_step_ratio)
        factor = step_scale * jnp.where(shortened, max_step_ratio / jnp.maximum(ratio, 1e-30), 1.0)
        new_theta = jax.tree_util.tree_map(lambda t, d: t + factor * d, theta, delta)
        accepted = tree_all_finite(new_theta) & tree_all_finite(new_state)
        keep = functools.partial(jax.tree_util.tree_map, lambda new, old: jnp.where(accepted, new, old))
        return OuterStep(keep(new_theta, theta), keep(new_state, state), accepted, ratio, shortened,
                         tree_l2_norm(gradient))

    return outer_step


def mean_gradient(gradients: list[Any]) -> Any:
    """Average of a member's per-slot meta-gradients (host arrays)."""
    return jax.tree_util.tree_map(lambda *g: np.mean(np.stack([np.asarray(x) for x in g]), axis=0), *gradients)


def _stack(trees: list[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *x: np.stack([np.asarray(v) for v in x]), *trees)


@functools.cache
def batched_outer_step_fn(lopt: LearnedOptimizer):
    """``outer_step_fn`` for several members at once (leading axis: member)."""
    return jax.jit(jax.vmap(outer_step_fn(lopt).__wrapped__, in_axes=(0, 0, 0, 0, 0, 0, None)))


def apply_outer_steps(
    members: list[Member],
    gradients: dict[int, list[Any]],
    lopt: LearnedOptimizer,
    settings: OuterSettings,
) -> dict[int, OuterStep]:
    """Update every member that has gradients, all from the same snapshot of
    the population (θ_{o(i)} as it was at the start of the round), in one call."""
    updated = [i for i in range(len(members)) if gradients.get(i)]
    if not updated:
        return {}
    result = batched_outer_step_fn(lopt)(
        _stack([members[members[i].outer_index].theta for i in updated]),
        _stack([members[i].theta for i in updated]),
        _stack([mean_gradient(gradients[i]) for i in updated]),
        _stack([members[i].outer_state for i in updated]),
        np.asarray([members[i].meta_loss for i in updated], np.float32),
        np.asarray([members[i].step_scale for i in updated], np.float32),
        settings,
    )
    result = jax.device_get(result)  # one transfer; members then hold numpy views
    steps = {}
    for k, i in enumerate(updated):
        step = jax.tree_util.tree_map(lambda x, k=k: x[k], result)
        members[i].theta, members[i].outer_state = step.theta, step.state
        if bool(step.accepted):
            members[i].steps += 1
        else:
            members[i].rejected_steps += 1
        steps[i] = step
    return steps


def is_finite_member(member: Member) -> bool:
    return bool(tree_all_finite(member.theta))
