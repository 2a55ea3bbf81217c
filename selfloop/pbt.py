"""Population-based training as the paper runs it (Jaderberg et al. 2017, PBT).

Every interval two random members are scored on the same E tasks freshly drawn
from the training distribution. The loser copies the winner's θ, outer-optimizer
index and outer-optimizer state (exploit); then with p = 0.5 its outer optimizer
is redrawn uniformly from the population and with p = 0.1 its truncation length
is redrawn (explore). A member with non-finite weights always loses and is never
copied. The held-out evaluation set is never used here.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass

import numpy as np

from selfloop.config import Config
from selfloop.curves import CurveUnit, run_curve_unit, stack_thetas
from selfloop.population import Member, is_finite_member
from selfloop.tasks.normalize import ratio_to_initial
from selfloop.tasks.sampler import sample_training_task


@dataclass(frozen=True)
class PBTEvent:
    """One tournament, as written to the event log."""

    time: float
    round: int
    winner: int
    loser: int
    winner_score: float
    loser_score: float
    copied: tuple[str, ...]  # what the loser took from the winner
    outer_redrawn: bool
    outer_index: int  # the loser's outer optimizer after the event
    truncation_redrawn: bool
    truncation: int  # the loser's K after the event

    def as_record(self) -> dict:
        return {"kind": "pbt", **asdict(self)}


COPIED = ("theta", "outer_index", "outer_state")


def tournament_tasks(config: Config, event_index: int):
    """E training-distribution tasks, fresh for every tournament."""
    rng = np.random.default_rng([config.run.seed, event_index, 0x7B7])
    return [sample_training_task(rng, config.tasks.families) for _ in range(config.pbt.tasks)]


class ScoringFailed(RuntimeError):
    """A tournament's scoring unit failed on the farm; the tournament is skipped."""


def score_members(map_fn, config: Config, members: list[Member], specs) -> np.ndarray:
    """Mean over tasks and steps of ℓ/ℓ_init (clipped): lower is better.

    One unit per task, each training every compared member side by side.
    """
    thetas = stack_thetas([m.theta for m in members])
    units = [CurveUnit(spec, config.lopt, thetas, config.pbt.steps, config.pbt.chunk) for spec in specs]
    per_task = []
    for curves in map_fn(run_curve_unit, units):
        if not isinstance(curves, np.ndarray):
            raise ScoringFailed(f"a scoring unit failed: {curves}")
        per_task.append(ratio_to_initial(curves, curves[0:1]).mean(axis=0))
    scores = np.mean(per_task, axis=0)
    finite = np.array([is_finite_member(m) for m in members])
    return np.where(finite, scores, np.inf)


def exploit(members: list[Member], winner: int, loser: int) -> None:
    """The loser takes the winner's θ, outer-optimizer index and its state."""
    source, target = members[winner], members[loser]
    target.theta = source.theta
    target.outer_index = source.outer_index
    target.outer_state = source.outer_state
    target.steps = source.steps
    target.last_exploit_step = source.steps
    target.guard = dataclasses.replace(source.guard)  # the lineage's history comes along


def explore(
    rng: np.random.Generator,
    member: Member,
    population_size: int,
    truncations: tuple[int, ...],
    p_outer: float,
    p_truncation: float,
) -> tuple[bool, bool]:
    """Redraw the outer optimizer (p_outer) and the truncation (p_truncation)."""
    outer_redrawn = bool(rng.random() < p_outer)
    if outer_redrawn:
        member.outer_index = int(rng.integers(population_size))
    truncation_redrawn = bool(rng.random() < p_truncation)
    if truncation_redrawn:
        member.truncation = int(rng.choice(truncations))
    return outer_redrawn, truncation_redrawn


def tournament(
    members: list[Member],
    map_fn,
    config: Config,
    rng: np.random.Generator,
    event_index: int,
    round_index: int,
) -> PBTEvent | None:
    """Run one tournament; ``None`` when neither member may be copied.

    ``map_fn(fn, items)`` runs the scoring units (a farm's ``map``).
    """
    a, b = (int(i) for i in rng.choice(len(members), size=2, replace=False))
    specs = tournament_tasks(config, event_index)
    scores = score_members(map_fn, config, [members[a], members[b]], specs)
    if not np.isfinite(scores).any():
        return None
    winner, loser = (a, b) if scores[0] <= scores[1] else (b, a)
    winner_score, loser_score = (scores[0], scores[1]) if winner == a else (scores[1], scores[0])
    exploit(members, winner, loser)
    outer_redrawn, truncation_redrawn = explore(
        rng,
        members[loser],
        len(members),
        config.population.truncations,
        config.pbt.p_outer_redraw,
        config.pbt.p_truncation_redraw,
    )
    members[loser].last_event = f"copied m{winner} @r{round_index}"
    return PBTEvent(
        time=time.time(),
        round=round_index,
        winner=winner,
        loser=loser,
        winner_score=float(winner_score),
        loser_score=float(loser_score),
        copied=COPIED,
        outer_redrawn=outer_redrawn,
        outer_index=members[loser].outer_index,
        truncation_redrawn=truncation_redrawn,
        truncation=members[loser].truncation,
    )
