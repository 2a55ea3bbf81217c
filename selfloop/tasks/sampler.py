"""Drawing task specs: a training sampler and a fixed, held-out evaluation set.

Training seeds and held-out seeds come from disjoint ranges, so no held-out
problem instance (its initialization, constants or data order) is ever trained
on, and the held-out set is used for reporting only, never for selection.
"""

from __future__ import annotations

import math

import numpy as np

from selfloop.tasks import TASK_FAMILIES
from selfloop.tasks.base import TaskSpec

TRAIN_SEEDS = (0, 2**30)
HELDOUT_SEEDS = (2**30, 2**31 - 1)


def _spec(rng: np.random.Generator, family_name: str, seed_range: tuple[int, int]) -> TaskSpec:
    family = TASK_FAMILIES[family_name]
    bucket_index = int(rng.integers(len(family.buckets)))
    dynamic = family.sample_dynamic(rng, family.buckets[bucket_index])
    return TaskSpec(
        family=family_name,
        bucket=bucket_index,
        seed=int(rng.integers(*seed_range)),
        dynamic=tuple(sorted((k, float(v)) for k, v in dynamic.items())),
    )


def sample_training_task(rng: np.random.Generator, families: tuple[str, ...],
                         probabilities: np.ndarray | None = None) -> TaskSpec:
    """One task from the training distribution: a uniformly chosen family, or
    one chosen with ``probabilities`` (one per family)."""
    if probabilities is None:
        return _spec(rng, families[int(rng.integers(len(families)))], TRAIN_SEEDS)
    return _spec(rng, families[int(rng.choice(len(families), p=probabilities))], TRAIN_SEEDS)


def heldout_tasks(count: int, families: tuple[str, ...], seed: int) -> tuple[TaskSpec, ...]:
    """The fixed held-out set: families in turn, so every family is covered."""
    rng = np.random.default_rng([seed, 0x4E1D])
    return tuple(_spec(rng, families[i % len(families)], HELDOUT_SEEDS) for i in range(count))


def unseen_family_tasks(
    count: int, trained: tuple[str, ...], unseen: tuple[str, ...], seed: int
) -> tuple[TaskSpec, ...]:
    """Held-out tasks of families left out of training, as many per family as
    the in-family set of ``count`` tasks over ``trained`` has (none without ``unseen``)."""
    if not unseen:
        return ()
    return heldout_tasks(math.ceil(count / len(trained)) * len(unseen), unseen, seed)
