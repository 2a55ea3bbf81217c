"""Population-based training as the paper runs it (Jaderberg et al. 2017, PBT).

Every interval two random members are scored on the same E tasks freshly drawn
from the training distribution. The loser copies the winner's θ, outer-optimizer
index and outer-optimizer state (exploit); then with p = 0.5 its outer optimizer
is redrawn uniformly from the population and with p = 0.1 its truncation length
is redrawn; the outer step scale it copied is multiplied or divided by
``pbt.step_scale_factor`` (explore). A member with non-finite weights always loses and is never
copied. The held-out evaluation set is never used here.

The champion (``pbt.champion``, issue #8): an archive of the best snapshot seen
(θ, outer-optimizer index and state, K), judged head to head. It is scored in
every tournament on the same tasks as the pair; the loser copies it instead of
the winner when it beats the winner there (by ``pbt.restore_confidence``
standard errors of its per-task advantage; by default any margin). A winner that beats it is a challenger:
both are scored again on ``pbt.champion_confirm_tasks`` further fresh tasks, and
the challenger replaces the champion only if it wins there too, by a margin of
``pbt.champion_confidence`` standard errors of its per-task advantage (with a
tournament every second, any margin let the champion random-walk on noise). A population
that has collapsed, or drifted, can thus always recover what it once reached,
and the champion changes only by losing twice on the training distribution,
or by retiring: with ``pbt.champion_record`` on, it keeps a record of how it
scored against each recent tournament's pair, and once it has been worse than
its pairs on average over that many tournaments, the winner is crowned instead
(a champion that is a little faster on most tasks and diverges on a few beats
small samples; its record sees the divergences). Another rail, not an update
rule: it only ever holds weights lopts produced.

Where the tasks come from (``pbt.task_allocation``): uniformly from the
training distribution, or ("spread") from families in proportion to how far
apart contestants' scores have been there, each score weighted back so that
every comparison still estimates the training distribution's mean. Trained
optimizers differ mostly on a few families, where some of them diverge now
and then; a few uniform tasks mostly miss those, and the optimizer that is
faster on typical tasks wins though its mean is worse.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import jax
import numpy as np

from selfloop.config import Config
from selfloop.events import Tournament
from selfloop.farm.curves import CurveUnit, run_curve_unit, stack_thetas
from selfloop.master.population import is_finite_member
from selfloop.state import Champion, FamilySpread, GuardState, Member, adopt, snapshot
from selfloop.tasks.normalize import ratio_to_initial
from selfloop.tasks.sampler import sample_training_task

COPIED = ("theta", "outer_index", "outer_state", "step_scale")


def crown(member: Member, index: int, round_index: int) -> Champion:
    return Champion(**vars(snapshot(member)), source=index, round=round_index)


TOURNAMENT_STREAM = 0x7B7


def tournament_tasks(config: Config, event_index: int, count: int | None = None, stream: int = TOURNAMENT_STREAM,
                     probabilities: np.ndarray | None = None):
    """``count`` (default E) training-distribution tasks, fresh for every
    tournament; families drawn with ``probabilities`` (None: uniformly)."""
    rng = np.random.default_rng([config.run.seed, event_index, stream])
    families = config.tasks.families
    return [sample_training_task(rng, families, probabilities) for _ in range(count or config.pbt.tasks)]


# Weight of one task's variance in its family's running spread: about the last
# 20 tasks of a family, a few minutes of tournaments, so the allocation
# follows where the population's optimizers currently differ.
SPREAD_MEMORY = 0.05


def family_probabilities(config: Config, spread: FamilySpread | None) -> np.ndarray | None:
    """Each family's probability of a tournament task (None: uniform draws).

    Neyman allocation: proportional to the standard deviation of contestants'
    scores there, mixed with ``pbt.allocation_floor`` of uniform draws; a
    family not seen yet counts as the most spread one seen."""
    families = len(config.tasks.families)
    if config.pbt.task_allocation == "uniform" or spread is None or not spread.weight.any():
        return None
    seen = spread.weight > 0
    sigma = np.sqrt(np.where(seen, spread.total / np.where(seen, spread.weight, 1.0), 0.0))
    sigma = np.where(seen, sigma, sigma[seen].max())
    floor = config.pbt.allocation_floor
    if sigma.sum() <= 0:
        return None
    return floor / families + (1.0 - floor) * sigma / sigma.sum()


def draw_tasks(config: Config, event_index: int, count: int, stream: int,
               probabilities: np.ndarray | None) -> tuple[list, np.ndarray]:
    """Tasks for a tournament or a challenge, families drawn with
    ``probabilities`` (``family_probabilities``; None: uniformly), and each
    one's importance weight (all 1 for uniform draws): a weighted mean of
    scores estimates the mean over the training distribution however the
    families were drawn."""
    specs = tournament_tasks(config, event_index, count, stream, probabilities)
    if probabilities is None:
        return specs, np.ones(len(specs))
    families = config.tasks.families
    return specs, np.array([1.0 / (len(families) * probabilities[families.index(s.family)]) for s in specs])


def observe_spread(spread: FamilySpread, families: tuple[str, ...], specs, per_task: np.ndarray) -> None:
    """Fold each task's variance of the contestants' finite scores into its family's spread."""
    for spec, scores in zip(specs, per_task):
        finite = scores[np.isfinite(scores)]
        if finite.size < 2:
            continue
        f = families.index(spec.family)
        spread.total[f] = (1 - SPREAD_MEMORY) * spread.total[f] + SPREAD_MEMORY * float(np.var(finite, ddof=1))
        spread.weight[f] = (1 - SPREAD_MEMORY) * spread.weight[f] + SPREAD_MEMORY


# Explored outer step scales: never above 1 (the rail stays the bound on a
# step), at most three decades below.
STEP_SCALE_RANGE = (1e-3, 1.0)
CONFIRM_STREAM = 0xC0F  # the challenge's tasks: disjoint from the tournament's draw


class ScoringFailed(RuntimeError):
    """A tournament's scoring unit failed on the farm; the tournament is skipped."""


def task_scores(map_fn, config: Config, members: list[Member], specs) -> np.ndarray:
    """[task, member]: mean over steps of ℓ/ℓ_init (clipped), lower is better;
    inf for a member with non-finite weights.

    One unit per task, each training every compared member side by side.
    """
    thetas = stack_thetas([m.theta for m in members])
    units = [CurveUnit(spec, config.lopt, thetas, config.pbt.steps, config.pbt.chunk) for spec in specs]
    per_task = []
    for curves in map_fn(run_curve_unit, units):
        if not isinstance(curves, np.ndarray):
            raise ScoringFailed(f"a scoring unit failed: {curves}")
        per_task.append(ratio_to_initial(curves, curves[0:1]).mean(axis=0))
    finite = np.array([is_finite_member(m) for m in members])
    return np.where(finite, np.stack(per_task), np.inf)


def weighted_scores(map_fn, config: Config, contestants: list, specs, weights: np.ndarray,
                    spread: FamilySpread | None) -> np.ndarray:
    """[task, contestant] scores times each task's importance weight; the
    unweighted scores update ``spread`` first."""
    per_task = task_scores(map_fn, config, contestants, specs)
    if spread is not None:
        observe_spread(spread, config.tasks.families, specs, per_task)
    return per_task * weights[:, None]


def advantage_t(advantage: np.ndarray) -> float:
    """Paired t statistic of per-task advantages (> 0: the challenger did
    better): their mean in standard errors; ±inf when they all agree exactly."""
    mean = float(np.mean(advantage))
    if np.isnan(mean):
        return -np.inf
    if len(advantage) < 2 or np.isinf(mean):
        return mean
    error = float(np.std(advantage, ddof=1)) / np.sqrt(len(advantage))
    if error > 0:
        return mean / error
    return 0.0 if mean == 0 else math.copysign(math.inf, mean)


def exploit(members: list[Member], winner: int, loser: int) -> None:
    """The loser takes the winner's θ, outer-optimizer index, its state and step
    scale (keeping its own K), and the winner's divergence history."""
    source, target = members[winner], members[loser]
    taken = dataclasses.replace(snapshot(source), truncation=target.truncation)
    adopt(target, taken, dataclasses.replace(source.guard))


def restore_champion(members: list[Member], champion: Champion, loser: int, with_truncation: bool = True) -> None:
    """The loser takes the champion's θ, outer-optimizer index, state, step scale
    and (``with_truncation``) K, with a new divergence history: the snapshot
    must earn its guard again."""
    taken = champion if with_truncation else dataclasses.replace(champion, truncation=members[loser].truncation)
    adopt(members[loser], taken, GuardState())


def explore(
    rng: np.random.Generator,
    member: Member,
    population_size: int,
    truncations: tuple[int, ...],
    p_outer: float,
    p_truncation: float,
    step_scale_factor: float = 1.0,
) -> tuple[bool, bool]:
    """Redraw the outer optimizer (p_outer) and the truncation (p_truncation);
    multiply or divide the step scale by ``step_scale_factor``."""
    if step_scale_factor > 1.0:
        factor = step_scale_factor if rng.random() < 0.5 else 1.0 / step_scale_factor
        member.step_scale = float(np.clip(member.step_scale * factor, *STEP_SCALE_RANGE))
    outer_redrawn = bool(rng.random() < p_outer)
    if outer_redrawn:
        member.outer_index = int(rng.integers(population_size))
    truncation_redrawn = bool(rng.random() < p_truncation)
    if truncation_redrawn:
        member.truncation = int(rng.choice(truncations))
    return outer_redrawn, truncation_redrawn


@dataclass(frozen=True)
class Challenge:
    """A winner against the champion on further fresh tasks (nan: not held)."""

    winner_score: float = float("nan")
    champion_score: float = float("nan")
    t: float = float("nan")  # the winner's mean per-task advantage, in standard errors
    won: bool = False


def challenge_champion(map_fn, config: Config, winner: Member, champion: Champion, event_index: int,
                       spread: FamilySpread | None = None) -> Challenge:
    """Score ``winner`` and ``champion`` on ``pbt.champion_confirm_tasks`` fresh tasks; the
    winner wins if it is better there by ``pbt.champion_confidence`` standard errors."""
    specs, weights = draw_tasks(config, event_index, config.pbt.champion_confirm_tasks, CONFIRM_STREAM,
                                family_probabilities(config, spread))
    per_task = weighted_scores(map_fn, config, [winner, champion], specs, weights, spread)
    winner_score, champion_score = (float(x) for x in per_task.mean(axis=0))
    t = advantage_t(per_task[:, 1] - per_task[:, 0])
    won = winner_score < champion_score and t >= config.pbt.champion_confidence
    return Challenge(winner_score, champion_score, t, won)


@dataclass(frozen=True)
class Bout:
    """A pair's scores on the tournament's tasks, and the champion's beside them."""

    winner: int
    loser: int
    winner_score: float
    loser_score: float
    champion_score: float = float("nan")  # nan: no champion
    restore_t: float = float("nan")  # the champion's per-task advantage over the winner, in standard errors


def keep_record(champion: Champion, bout: Bout, window: int) -> Champion:
    """The champion with this bout in its record (the newest ``window`` kept):
    its mean score minus the mean of the pair's finite scores."""
    pair = np.array([bout.winner_score, bout.loser_score])
    pair = pair[np.isfinite(pair)]
    if window == 0 or not pair.size:
        return champion
    entry = float(bout.champion_score - pair.mean())
    return dataclasses.replace(champion, record=(*champion.record, entry)[-window:])


def is_stale(champion: Champion | None, window: int) -> bool:
    """Worse than the members it met, on average over ``window`` tournaments (0: never)."""
    return (champion is not None and window > 0 and len(champion.record) >= window
            and float(np.mean(champion.record)) > 0)


def same_weights(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def judge(per_task: np.ndarray, a: int, b: int) -> Bout:
    """The bout of members ``a`` and ``b`` from their [task, contestant] scores
    (columns a, b, then the champion's if there is one)."""
    scores = per_task.mean(axis=0)
    first_wins = scores[0] <= scores[1]
    winner, loser, w, lo = (a, b, 0, 1) if first_wins else (b, a, 1, 0)
    if per_task.shape[1] < 3:
        return Bout(winner, loser, float(scores[w]), float(scores[lo]))
    return Bout(winner, loser, float(scores[w]), float(scores[lo]), float(scores[2]),
                advantage_t(per_task[:, w] - per_task[:, 2]))


def settle_champion(map_fn, config: Config, members: list[Member], bout: Bout, champion: Champion | None,
                    event_index: int, round_index: int, retire: bool = False,
                    spread: FamilySpread | None = None) -> tuple[Challenge, bool, Champion | None]:
    """Crown the winner if the champion retires, else challenge the champion if the
    winner beat it; returns the challenge, whether the champion was replaced, and
    the champion after it."""
    challenged = not retire and champion is not None and bout.winner_score < bout.champion_score
    challenge = Challenge()
    if challenged and config.pbt.champion_confirm_tasks:
        challenge = challenge_champion(map_fn, config, members[bout.winner], champion, event_index, spread)
    confirmed = challenge.won if config.pbt.champion_confirm_tasks else True
    replaced = config.pbt.champion and (champion is None or retire or challenged and confirmed)
    if replaced:
        champion = crown(members[bout.winner], bout.winner, round_index)
    return challenge, replaced, champion


def tournament(
    members: list[Member],
    map_fn,
    config: Config,
    rng: np.random.Generator,
    event_index: int,
    round_index: int,
    champion: Champion | None = None,
    spread: FamilySpread | None = None,
) -> tuple[Tournament | None, Champion | None]:
    """Run one tournament; returns its event (``None`` when neither member may
    be copied) and the champion after it (``None`` while ``pbt.champion`` is off).

    ``map_fn(fn, items)`` runs the scoring units (a farm's ``map``). ``spread``
    (``pbt.task_allocation = "spread"``) is where tasks are drawn, and is
    updated in place with this tournament's scores.
    """
    a, b = (int(i) for i in rng.choice(len(members), size=2, replace=False))
    contestants = [members[a], members[b]] + ([champion] if champion is not None else [])
    probabilities = family_probabilities(config, spread)
    specs, weights = draw_tasks(config, event_index, config.pbt.tasks, TOURNAMENT_STREAM, probabilities)
    per_task = weighted_scores(map_fn, config, contestants, specs, weights, spread)
    if not np.isfinite(per_task.mean(axis=0)[:2]).any():
        return None, champion
    bout, pbt = judge(per_task, a, b), config.pbt
    if champion is not None:
        champion = keep_record(champion, bout, pbt.champion_record)
    record = float(np.mean(champion.record)) if champion is not None and champion.record else math.nan
    # A winner that is a copy of the champion, not yet stepped, would only crown it again.
    retired = is_stale(champion, pbt.champion_record) and not same_weights(members[bout.winner].theta,
                                                                           champion.theta)
    from_champion = (not retired and bout.champion_score < bout.winner_score
                     and bout.restore_t >= pbt.restore_confidence)
    if from_champion:
        restore_champion(members, champion, bout.loser, pbt.restore_truncation)
    else:
        exploit(members, bout.winner, bout.loser)
    challenge, replaced, champion = settle_champion(map_fn, config, members, bout, champion, event_index,
                                                    round_index, retired, spread)
    loser = members[bout.loser]
    outer_redrawn, truncation_redrawn = explore(rng, loser, len(members), config.population.truncations,
                                                pbt.p_outer_redraw, pbt.p_truncation_redraw, pbt.step_scale_factor)
    loser.last_event = f"copied {'champion' if from_champion else f'm{bout.winner}'} @r{round_index}"
    copied = COPIED + (("truncation",) if from_champion and pbt.restore_truncation else ())
    return Tournament(
        time=time.time(), round=round_index, winner=bout.winner, loser=bout.loser, winner_score=bout.winner_score,
        loser_score=bout.loser_score, copied=copied,
        outer_redrawn=outer_redrawn, outer_index=loser.outer_index, truncation_redrawn=truncation_redrawn,
        truncation=loser.truncation, source="champion" if from_champion else "winner",
        champion_score=bout.champion_score, champion_replaced=replaced, confirm_winner_score=challenge.winner_score,
        confirm_champion_score=challenge.champion_score, confirm_t=challenge.t, restore_t=bout.restore_t,
        champion_record=record, champion_retired=retired, step_scale=loser.step_scale,
        allocation=() if probabilities is None else tuple(float(p) for p in probabilities),
    ), champion
