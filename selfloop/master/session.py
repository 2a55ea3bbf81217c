"""A session's limits and what it shows while it runs: the time budget, stop
requests (signals), and progress lines for long phases."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class StopFlag:
    """Set by a signal handler; the loop stops at the end of the current round."""

    def __init__(self):
        self.reason: str | None = None

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        self.reason = reason


class Session:
    """This session's limits: a stop request and the time budget.

    Rounds stop starting at ``max_minutes`` (counted from the session's start,
    preparation included); any phase still running (preparation, an
    evaluation, the final one) is cut at the hard limit, a grace of a quarter
    of the budget (at least 15 s) later, so a run never overstays by more.
    """

    GRACE_FRACTION, GRACE_MIN_SECONDS = 0.25, 15.0

    def __init__(self, max_minutes: float = 0.0, stop: StopFlag | None = None, started: float | None = None):
        self.max_minutes, self.stop = max_minutes, stop or StopFlag()
        self.started = time.time() if started is None else started

    @property
    def budget_seconds(self) -> float:
        return 60.0 * self.max_minutes if self.max_minutes > 0 else math.inf

    def out_of_time(self) -> bool:
        return time.time() - self.started >= self.budget_seconds

    def must_end(self) -> bool:
        """A stop was requested or the hard limit passed: cut the running phase."""
        budget = self.budget_seconds
        grace = max(self.GRACE_FRACTION * budget, self.GRACE_MIN_SECONDS)
        return self.stop.requested or time.time() - self.started >= budget + grace

    @property
    def reason(self) -> str:
        return self.stop.reason or "budget"


class PhaseProgress:
    """A farm's progress callback: passes "<phase>: done/total units, ~N s left"
    to ``show`` at most every ``every`` seconds."""

    def __init__(self, show: Callable[[str], None], phase: str, every: float = 5.0):
        self.show, self.phase, self.every = show, phase, every
        self.started = self.last = time.time()

    def __call__(self, done: int, total: int) -> None:
        now = time.time()
        if now - self.last < self.every or done >= total:
            return
        self.last = now
        left = (now - self.started) / done * (total - done) if done else math.nan
        eta = f", ~{left:.0f} s left" if math.isfinite(left) else ""
        self.show(f"{self.phase}: {done}/{total} units{eta}")
