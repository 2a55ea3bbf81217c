"""Divergence guard: roll a member back to its best snapshot before it spreads.

Self-training has a failure mode of its own: strong optimizers take strong
steps on each other's weights too, and a member that diverges drags down every
member it trains (measured here: a default run that had reached
0.26 held-out loss collapsed to 1.3-1.5 in every member about 14 minutes in).

Each member keeps an exponential moving average of its *training* meta-loss
(never the held-out set: mean ℓ/ℓ_init over its unrolls) and a snapshot of
(θ, outer state) taken whenever that average reaches a new best. Once the
average exceeds 1 + ``margin`` (its inner problems end worse than they
started) while the member has gains to keep (best average at least
``min_gain`` below 1.0), the member is restored from its snapshot, the round's
outer step for it is discarded, and its outer optimizer
becomes the member whose average is currently lowest. A snapshot serves once:
the member's history restarts, so it must earn a new best to be guarded again. A rail, not an update
rule: it only ever restores weights that learned optimizers produced.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from selfloop.config import GuardConfig
from selfloop.state import GuardState, Member, adopt, snapshot


def observe(guard: GuardState, meta_loss: float, theta: Any, outer_state: Any, config: GuardConfig) -> bool:
    """Fold in one round's meta-loss (measured with ``theta``); True if diverged."""
    if not math.isfinite(meta_loss):
        return False
    if math.isnan(guard.ema):
        guard.ema = meta_loss
    else:
        guard.ema = (1 - config.smoothing) * guard.ema + config.smoothing * meta_loss
    if guard.ema < guard.best_ema:
        guard.best_ema, guard.best_theta, guard.best_outer_state = guard.ema, theta, outer_state
        return False
    has_gains = guard.best_ema <= 1.0 - config.min_gain
    return has_gains and guard.ema > 1.0 + config.margin


def healthiest(guards: list[GuardState]) -> int:
    """Index of the member with the lowest current smoothed meta-loss."""
    return min(range(len(guards)), key=lambda i: guards[i].ema if math.isfinite(guards[i].ema) else math.inf)


def roll_back(member: Member, outer_index: int) -> None:
    """Restore ``member`` from its guard's snapshot, trained from now on by
    member ``outer_index``. Each snapshot serves once: the member must earn a
    new best before it is guarded again, so a snapshot that only looked good
    cannot trap it."""
    guard = member.guard
    best = dataclasses.replace(snapshot(member), theta=guard.best_theta, outer_state=guard.best_outer_state,
                               outer_index=outer_index)
    adopt(member, best, GuardState(rollbacks=guard.rollbacks + 1))
