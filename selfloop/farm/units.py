"""Work units: one member's unroll on one of its persistent inner problems.

A unit carries everything it needs (θ, the task spec, the inner state, K and a
key derived from run seed, round, member and slot), so it can run on any worker
and a retried unit computes exactly the same result. Results carry the
meta-gradient contribution, the segment's meta-loss and the advanced state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from selfloop.config import NOISY_QUADRATIC, EstimatorConfig, LOptConfig, TasksConfig
from selfloop.estimators import SlotState, estimate_gradient, needs_reset, new_slot
from selfloop.lopt import make_lopt
from selfloop.tasks.base import TaskSpec
from selfloop.tasks.sampler import sample_training_task


@dataclass(frozen=True)
class UnitContext:
    """Settings shared by every unit of a run (hashable)."""

    seed: int
    lopt: LOptConfig
    estimator: EstimatorConfig
    tasks: TasksConfig

    @property
    def horizon(self) -> tuple[float, float]:
        return (float(self.tasks.horizon_min), float(self.tasks.horizon_max))


@dataclass(frozen=True)
class WorkUnit:
    round: int
    member: int
    slot: int
    theta: Any
    spec: TaskSpec
    state: SlotState
    truncation: int


@dataclass(frozen=True)
class UnitResult:
    round: int
    member: int
    slot: int
    gradient: Any
    meta_loss: float
    spec: TaskSpec
    state: SlotState
    replaced: bool  # the slot's episode had ended and a new task was drawn
    seconds: float = 0.0  # compute time, for ordering the next round's units (never part of the state)


def slot_task(context: UnitContext, member: int, slot: int, generation: int) -> TaskSpec:
    """The task a slot trains in its ``generation``-th episode: a pure function
    of the run seed and the slot's position, so replays draw the same task."""
    rng = np.random.default_rng([context.seed, member, slot, generation, 0x7A5C])
    if context.tasks.noisy_quadratic_share > 0 and rng.random() < context.tasks.noisy_quadratic_share:
        return sample_training_task(rng, (NOISY_QUADRATIC,))
    return sample_training_task(rng, context.tasks.families)


def initial_slot(context: UnitContext, member: int, slot: int, theta: Any) -> tuple[TaskSpec, SlotState]:
    """Generation 0 of a slot: its task and fresh inner state."""
    spec = slot_task(context, member, slot, 0)
    lopt = make_lopt(context.lopt)
    return spec, new_slot(lopt, spec, theta, context.estimator, context.horizon, episode=0)


def unit_key(seed: int, round_index: int, member: int, slot: int) -> jax.Array:
    key = jax.random.PRNGKey(seed)
    for part in (round_index, member, slot):
        key = jax.random.fold_in(key, part)
    return key


def run_unit(context: UnitContext, unit: WorkUnit) -> UnitResult:
    """Estimate one meta-gradient contribution; pure in its inputs."""
    start = time.perf_counter()
    lopt = make_lopt(context.lopt)
    spec, state = unit.spec, unit.state
    replaced = needs_reset(state)
    if replaced:
        generation = int(state.episode.index) + 1
        spec = slot_task(context, unit.member, unit.slot, generation)
        state = new_slot(lopt, spec, unit.theta, context.estimator, context.horizon, episode=generation)
    estimate = estimate_gradient(
        lopt,
        unit.theta,
        spec,
        state,
        unit.truncation,
        context.estimator,
        context.horizon,
        unit_key(context.seed, unit.round, unit.member, unit.slot),
    )
    jax.block_until_ready(estimate)
    return UnitResult(
        round=unit.round,
        member=unit.member,
        slot=unit.slot,
        gradient=estimate.gradient,
        meta_loss=estimate.meta_loss,
        spec=spec,
        state=estimate.slot,
        replaced=replaced,
        seconds=time.perf_counter() - start,
    )


def warm_up(context: UnitContext, truncation: int) -> int:
    """Compile every training program of ``context`` in this process (one
    segment of each family bucket); returns how many buckets were warmed."""
    from selfloop.tasks import TASK_FAMILIES

    lopt = make_lopt(context.lopt)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    count = 0
    for name in context.tasks.episode_families:
        family = TASK_FAMILIES[name]
        for bucket in range(len(family.buckets)):
            spec = sample_training_task(rng, (name,))
            spec = TaskSpec(name, bucket, spec.seed, spec.dynamic)
            state = new_slot(lopt, spec, theta, context.estimator, context.horizon)
            needs_reset(state)
            estimate_gradient(lopt, theta, spec, state, truncation, context.estimator, context.horizon,
                              jax.random.PRNGKey(1))
            count += 1
    return count
