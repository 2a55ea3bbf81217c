"""Held-out evaluation against Adam on the very same tasks.

Every member trains each held-out task from the same initialization with the
same data; so does Adam at each of the 15 fixed learning rates. Curves are
normalized per task (TaskSet style) by the best loss any Adam rate reached.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from selfloop.config import LOptConfig
from selfloop.farm.curves import CurveUnit, run_curve_unit, stack_thetas
from selfloop.store.rundir import RunDir
from selfloop.tasks.base import TaskSpec
from selfloop.tasks.normalize import normalize_curve
from selfloop.unroll import learning_curves


class EvaluationFailed(RuntimeError):
    """An evaluation unit failed on the farm after its retries."""


def all_succeeded(results: list, what: str) -> list[np.ndarray]:
    for result in results:
        if not isinstance(result, np.ndarray):
            raise EvaluationFailed(f"{what} unit failed: {result}")
    return results


@dataclass(frozen=True)
class AdamUnit:
    spec: TaskSpec
    steps: int
    chunk: int


def run_adam_unit(unit: AdamUnit) -> np.ndarray:
    """Adam at all 15 rates on one task: float64 [steps + 1, 15]."""
    from selfloop.evaluation.baselines import ADAM, learning_rate_batch

    return learning_curves(unit.spec, ADAM, learning_rate_batch(), unit.steps, unit.chunk)


@dataclass(frozen=True)
class AdamReference:
    """Adam's curves on a held-out set: ``curves[task]`` is [steps + 1, 15]."""

    learning_rates: tuple[float, ...]
    curves: tuple[np.ndarray, ...]

    @functools.cached_property
    def best_losses(self) -> np.ndarray:
        """ℓ_best per task: the lowest loss any learning rate reached (computed once)."""
        return np.array([np.nanmin(np.where(np.isfinite(c), c, np.nan)) for c in self.curves])

    @functools.cached_property
    def init_losses(self) -> np.ndarray:
        return np.array([c[0, 0] for c in self.curves])

    @functools.cached_property
    def summary(self) -> tuple[np.ndarray, float]:
        """(mean normalized loss of each fixed rate, of per-task tuned Adam); constant per set."""
        return adam_summary(self)


def _reference_key(specs: tuple[TaskSpec, ...], steps: int) -> str:
    text = json.dumps([asdict(s) for s in specs] + [steps], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def adam_reference(
    specs: tuple[TaskSpec, ...], steps: int, chunk: int, map_fn=map, cache_dir: Path | None = None
) -> AdamReference:
    """Adam at every rate on every task; loaded from ``cache_dir`` when computed before."""
    from selfloop.evaluation import ADAM_LEARNING_RATES

    path = RunDir(cache_dir).adam_reference(_reference_key(specs, steps)) if cache_dir else None
    if path is not None and path.exists():
        stored = np.load(path)
        return AdamReference(tuple(stored["learning_rates"]), tuple(stored[f"task{i}"] for i in range(len(specs))))
    units = [AdamUnit(spec, steps, chunk) for spec in specs]
    curves = all_succeeded(list(map_fn(run_adam_unit, units)), "Adam reference")
    reference = AdamReference(ADAM_LEARNING_RATES, tuple(curves))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, learning_rates=np.asarray(ADAM_LEARNING_RATES), **{f"task{i}": c for i, c in enumerate(curves)})
        tmp.replace(path)
    return reference


@dataclass(frozen=True)
class HeldoutResult:
    """Mean normalized loss (over tasks and steps) for members and baselines."""

    members: np.ndarray  # [members]
    members_final: np.ndarray  # [members]: normalized loss at the last step
    adam_fixed: np.ndarray  # [15]: one fixed rate for every task
    adam_tuned: float  # best rate chosen per task

    @property
    def best_fixed_adam(self) -> float:
        return float(np.min(self.adam_fixed))


def normalized_curves(curves: np.ndarray, reference: AdamReference, task: int) -> np.ndarray:
    return normalize_curve(curves, reference.init_losses[task], reference.best_losses[task])


def adam_summary(reference: AdamReference) -> tuple[np.ndarray, float]:
    """(mean normalized loss of each fixed rate, of per-task tuned Adam)."""
    per_task = np.stack([normalized_curves(c, reference, t).mean(axis=0) for t, c in enumerate(reference.curves)])
    return per_task.mean(axis=0), float(per_task.min(axis=1).mean())


def heldout_task_scores(
    map_fn, lopt: LOptConfig, thetas: list, specs: tuple[TaskSpec, ...], steps: int, chunk: int,
    reference: AdamReference,
) -> tuple[np.ndarray, np.ndarray]:
    """Every optimizer on every held-out task (one unit per task), normalized
    against Adam: ([task, optimizer] mean over steps, [task, optimizer] at the last step)."""
    stacked = stack_thetas(thetas)
    units = [CurveUnit(spec, lopt, stacked, steps, chunk) for spec in specs]
    means, finals = [], []
    for t, curves in enumerate(all_succeeded(list(map_fn(run_curve_unit, units)), "evaluation")):
        normalized = normalized_curves(curves, reference, t)
        means.append(normalized.mean(axis=0))
        finals.append(normalized[-1])
    return np.stack(means), np.stack(finals)


def evaluate_members(
    map_fn, lopt: LOptConfig, thetas: list, specs: tuple[TaskSpec, ...], steps: int, chunk: int,
    reference: AdamReference,
) -> HeldoutResult:
    """Every member's mean normalized loss over the held-out tasks, beside Adam's."""
    means, finals = heldout_task_scores(map_fn, lopt, thetas, specs, steps, chunk, reference)
    fixed, tuned = reference.summary
    return HeldoutResult(means.mean(axis=0), finals.mean(axis=0), fixed, tuned)
