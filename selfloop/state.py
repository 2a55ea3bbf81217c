"""Every host-side state of a run, and the one way a member takes on a snapshot.

A member's lineage at one moment is a ``Snapshot``: its lopt weights θ, the
outer optimizer that trains them and that optimizer's state, K and the outer
step scale. PBT's exploit and champion restore, the champion itself and the
divergence guard's rollback all copy snapshots through ``adopt``, so what a
copy carries is defined once. A checkpoint holds exactly a ``RunState``
(``selfloop.store.checkpoint`` derives its fields from these dataclasses).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from selfloop.estimators import SlotState
from selfloop.tasks.base import TaskSpec


@dataclass
class GuardState:
    """The divergence guard's view of one member (selfloop/master/guard.py)."""

    ema: float = math.nan  # smoothed training meta-loss
    best_ema: float = math.inf
    best_theta: Any = None  # θ when best_ema was reached
    best_outer_state: Any = None
    rollbacks: int = 0


@dataclass
class Slot:
    """One persistent inner problem of a member: its task and its state between units."""

    spec: TaskSpec
    state: SlotState


@dataclass(frozen=True)
class Snapshot:
    """What a copy of a member's lineage carries."""

    theta: Any  # lopt weights
    outer_state: Any  # the state the outer optimizer's lopt keeps for θ
    outer_index: int  # whose lopt updates θ
    truncation: int  # K
    steps: int  # outer steps these weights have taken
    step_scale: float = 1.0  # multiplies the outer optimizer's step; explored by PBT


@dataclass(frozen=True)
class Champion(Snapshot):
    """The best snapshot seen, judged head to head in PBT tournaments."""

    source: int = -1  # the member it was taken from
    round: int = 0  # when
    # Its record since it was crowned: in each recent tournament, its mean
    # per-task score minus the pair's (> 0: worse than the members it met).
    record: tuple[float, ...] = ()


@dataclass
class Member:
    theta: Any  # lopt weights
    outer_state: Any  # state that the outer optimizer's lopt keeps for θ
    outer_index: int  # o(i): whose lopt updates this member
    truncation: int  # K
    slots: list[Slot]
    steps: int = 0  # outer steps taken by this lineage's weights
    step_scale: float = 1.0  # multiplies the outer optimizer's step; explored by PBT
    last_exploit_step: int = 0
    meta_loss: float = float("nan")
    last_event: str = "init"
    rejected_steps: int = 0
    history: list[float] = field(default_factory=list)  # held-out scores
    guard: GuardState = field(default_factory=GuardState)


def snapshot(member: Member) -> Snapshot:
    """The member's lineage as it is now."""
    return Snapshot(member.theta, member.outer_state, member.outer_index, member.truncation, member.steps,
                    member.step_scale)  # fmt: skip


def adopt(member: Member, taken: Snapshot, guard: GuardState) -> None:
    """``member`` continues from ``taken`` with the divergence history ``guard``;
    its own inner problems (slots) and held-out history stay."""
    member.theta, member.outer_state = taken.theta, taken.outer_state
    member.outer_index, member.truncation = taken.outer_index, taken.truncation
    member.steps = member.last_exploit_step = taken.steps
    member.step_scale = taken.step_scale
    member.guard = guard


@dataclass
class FamilySpread:
    """How far apart optimizers score on each training family (in the order of
    ``tasks.families``): per family, a running mean of the variance of the
    contestants' scores on one task, bias-corrected as ``total / weight``
    (weight 0: not seen yet). PBT draws its tasks where it is large
    (``pbt.task_allocation``, selfloop/master/pbt.py)."""

    total: np.ndarray  # float64 [family]
    weight: np.ndarray  # float64 [family]

    @classmethod
    def unseen(cls, families: int) -> FamilySpread:
        return cls(np.zeros(families), np.zeros(families))


@dataclass
class RunState:
    """The population and its controller: everything a checkpoint holds.

    Times are seconds of run time (``elapsed`` counts across resumes), so a
    resumed run keeps its PBT, evaluation and checkpoint cadence.
    """

    members: list[Member]
    round: int = 0
    pbt_events: int = 0
    pbt_rng: np.random.Generator = field(default_factory=np.random.default_rng)
    last_pbt_time: float = 0.0
    last_pbt_round: int = 0
    last_eval_time: float = 0.0
    last_eval_round: int = 0
    last_checkpoint_time: float = 0.0
    last_checkpoint_round: int = 0
    inner_steps: int = 0
    elapsed: float = 0.0
    first_best: float = float("nan")  # best held-out score of the random population (of this held-out series)
    heldout_set: str = ""  # which held-out set the members' histories are on ("": a checkpoint from before)
    resumed_from: int | None = None  # round of the checkpoint this session started from
    champion: Champion | None = None  # the best snapshot seen (None until the first tournament)
    family_spread: FamilySpread | None = None  # None unless pbt.task_allocation = "spread"


def plain_fields(cls: type, *, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Names of ``cls``'s fields that hold a plain number or string (stored as attributes)."""
    plain = {"int", "float", "str", "bool", "int | None"}
    return tuple(f.name for f in dataclasses.fields(cls) if f.type in plain and f.name not in exclude)
