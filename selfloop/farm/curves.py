"""Learning-curve units: a batch of lopt weights trains one task from scratch.

Shared by PBT scoring (training-distribution tasks) and held-out evaluation;
plain, picklable inputs so that the farm can run them on any worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from selfloop.config import LOptConfig
from selfloop.estimators import as_inner_optimizer
from selfloop.lopt import make_lopt
from selfloop.tasks.base import TaskSpec
from selfloop.unroll import learning_curves


@dataclass(frozen=True)
class CurveUnit:
    spec: TaskSpec
    lopt: LOptConfig
    thetas: Any  # lopt weights stacked on a leading axis, one per curve
    steps: int
    chunk: int


def run_curve_unit(unit: CurveUnit) -> np.ndarray:
    """float64 [steps + 1, len(thetas)]: loss before each step, then after the last."""
    optimizer = as_inner_optimizer(make_lopt(unit.lopt))
    return learning_curves(unit.spec, optimizer, unit.thetas, unit.steps, unit.chunk)


def stack_thetas(thetas: list) -> Any:
    """One pytree whose leaves stack the members' leaves (numpy, for pickling)."""
    return jax.tree_util.tree_map(lambda *t: np.stack([np.asarray(x) for x in t]), *thetas)
