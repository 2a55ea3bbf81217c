"""Reading a run's ``events.jsonl`` back: what the numbers in BENCHMARKS.md come from.

    python -m selfloop.observe.history checkpoints/default/events.jsonl [--plot history.png]
    python -m selfloop.observe.history --ablation all=checkpoints/a/events.jsonl no-guard=checkpoints/b/events.jsonl
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfloop.evaluation import ADAM_LEARNING_RATES
from selfloop.events import Eval, Event, Round, of_type, read_events


def first_time_below(evals: list[Eval], threshold: str) -> float | None:
    """Elapsed seconds of the first evaluation whose best member beat Adam's ``threshold``
    (``"adam_best_fixed"`` or ``"adam_tuned"``)."""
    return next((e.elapsed for e in evals if e.best < getattr(e, threshold)), None)


def inner_steps_at_evals(events: list[Event]) -> list[int]:
    """Inner training steps the run had taken at each evaluation (those of its last round before it)."""
    steps, at_evals = 0, []
    for event in events:
        if isinstance(event, Round):
            steps = event.inner_steps
        elif isinstance(event, Eval):
            at_evals.append(steps)
    return at_evals


@dataclass(frozen=True)
class RailUse:
    """How often the outer-step rails acted, over every member's outer steps."""

    outer_steps: int
    shortened: int  # by the step-size rail
    rejected: int  # non-finite
    # Percentiles (50, 90, 99) of every proposed ‖Δθ‖/‖θ‖ (empty: older logs),
    # the tail the rail cuts.
    proposed: tuple[float, ...] = ()
    estimates: int = 0  # units' meta-gradient estimates that reached an outer step (older logs: 0)
    clipped: int = 0  # of them, shortened by ``estimator.outlier_clip``

    @property
    def shortened_fraction(self) -> float:
        return self.shortened / max(self.outer_steps, 1)

    @property
    def clipped_fraction(self) -> float:
        return self.clipped / max(self.estimates, 1)


PROPOSAL_PERCENTILES = (50, 90, 99)


def rail_use(events: list[Event]) -> RailUse:
    rounds = of_type(events, Round)
    ratios = np.array([x for r in rounds for x in r.step_ratios], dtype=np.float64)
    ratios = ratios[np.isfinite(ratios)]
    return RailUse(
        outer_steps=sum(len(r.meta_loss) if r.outer_steps is None else r.outer_steps for r in rounds),
        shortened=sum(r.shortened for r in rounds),
        rejected=sum(r.rejected for r in rounds),
        proposed=tuple(np.percentile(ratios, PROPOSAL_PERCENTILES)) if ratios.size else (),
        estimates=sum(r.estimates for r in rounds),
        clipped=sum(r.clipped_estimates for r in rounds),
    )


def latest_series(events: list[Event]) -> tuple[list[Eval], list[int], int]:
    """The evaluations on the run's latest held-out set (a resume with other
    eval.* settings starts a new series), the inner steps at each, and how
    many earlier series there were."""
    evals = of_type(events, Eval)
    steps = inner_steps_at_evals(events)
    sets = [e.heldout_set for e in evals]  # older logs: None throughout
    changes = [i for i in range(1, len(sets)) if sets[i] != sets[i - 1]]
    first = changes[-1] if changes else 0
    return evals[first:], steps[first:], len(changes)


def summary(events: list[Event]) -> str:
    """A plain-text table of the held-out evaluations of one run (its latest held-out series)."""
    evals, steps_at, earlier = latest_series(events)
    if not evals:
        return "no evaluations in this log"
    lines = [f"{'round':>6} {'elapsed s':>10} {'inner M':>8} {'best member':>12} {'best loss':>10} {'median':>8} "
             f"{'champion':>9}"]
    if earlier:
        lines.insert(0, f"held-out set {evals[0].heldout_set} since round {evals[0].round}: "
                        f"{earlier} earlier series on other held-out settings are not shown")
    for e, steps in zip(evals, steps_at):
        members, champion = sorted(e.members), e.champion
        lines.append(
            f"{e.round:>6} {e.elapsed:>10.1f} {steps / 1e6:>8.2f} {'m' + str(e.best_member):>12} "
            f"{e.best:>10.3f} {members[len(members) // 2]:>8.3f} {'-' if champion is None else f'{champion:.3f}':>9}"
        )
    first, last = evals[0], evals[-1]
    rails = rail_use(events)
    lines.append("")
    lines.append(f"outer steps: {rails.outer_steps}; shortened by the step rail {rails.shortened_fraction:.1%}, "
                 f"rejected as non-finite {rails.rejected}")
    if rails.proposed:
        lines.append("proposed outer steps, ‖Δθ‖/‖θ‖: " + ", ".join(
            f"{q}th percentile {100 * v:.2f} %" for q, v in zip(PROPOSAL_PERCENTILES, rails.proposed)))
    if rails.clipped:
        lines.append(f"meta-gradient estimates shortened by estimator.outlier_clip: {rails.clipped_fraction:.1%} "
                     f"of {rails.estimates}")
    scales = next((r.step_scale for r in reversed(of_type(events, Round)) if r.step_scale), None)
    if scales:
        lines.append(f"outer step scales (PBT-explored), last round: median {sorted(scales)[len(scales) // 2]:.3g}, "
                     f"range {min(scales):.3g}-{max(scales):.3g}")
    lines.append(
        f"best member, held-out mean normalized loss: start {first.best:.3f} -> end {last.best:.3f} "
        f"(x{first.best / max(last.best, 1e-12):.2f} lower); lowest seen {min(e.best for e in evals):.3f}"
    )
    lines.append("Adam on the same tasks (mean normalized loss):")
    for rate, value in zip(ADAM_LEARNING_RATES, last.adam_fixed):
        lines.append(f"  lr {rate:<8.2g} {value:.3f}")
    lines.append(f"  best fixed lr {last.adam_best_fixed:.3f}   per-task tuned {last.adam_tuned:.3f}")
    if last.unseen:
        unseen = last.unseen
        lines.append(f"families left out of training, last evaluation: best member {unseen.best:.3f}; Adam best "
                     f"fixed lr {unseen.adam_best_fixed:.3f}, per-task tuned {unseen.adam_tuned:.3f}")
    for label, key in (("best fixed-lr Adam", "adam_best_fixed"), ("per-task tuned Adam", "adam_tuned")):
        when = first_time_below(evals, key)
        lines.append(f"first beat {label}: " + (f"{when:.0f} s" if when is not None else "not within this run"))
    return "\n".join(lines)


def within(events: list[Event], minutes: float | None) -> list[Event]:
    """The events of the first ``minutes`` of run time (all when None): a shorter budget, read
    from a longer run (stopping a run later does not change its first minutes). A run stopped
    by its budget finishes the round under way and then evaluates it, after the budget has run
    out; that evaluation belongs to the budget too."""
    if minutes is None:
        return events
    limit = 60.0 * minutes
    rounds_past = (r.round for r in of_type(events, Round) if r.elapsed > limit)
    last_round = next(rounds_past, math.inf)  # the round under way when the budget ran out
    # Events without a run time (a start, progress) and a tournament's nan pass the test below.
    return [e for e in events
            if not getattr(e, "elapsed", 0.0) > limit or (isinstance(e, Eval) and e.round <= last_round)]  # fmt: skip


@dataclass(frozen=True)
class Stability:
    """How well a run kept its gains (issue #8's criterion), from its held-out evaluations."""

    halved_at: float | None  # elapsed s when the best member first fell below half its start
    violations: int  # evaluations after that with best > 1.5 x running minimum + 0.05
    worst_excess: float  # largest best / (1.5 x running minimum + 0.05) after halving
    collapses: int  # times every member was above its own starting loss at once
    final_best: float
    lowest_best: float


def stability(evals: list[Eval]) -> Stability:
    """Evaluations come every eval interval (120 s by default); a violating one is
    counted as lasting until the next, so any violation counts as one longer
    than a PBT interval (1 s by default), the criterion's strictest reading."""
    start = evals[0].best
    starting = evals[0].members
    halved_at, running_min, violations, worst, collapses, collapsed = None, math.inf, 0, 0.0, 0, False
    for e in evals:
        running_min = min(running_min, e.best)
        if halved_at is None and e.best < 0.5 * start:
            halved_at = e.elapsed
        if halved_at is not None:
            limit = 1.5 * running_min + 0.05
            worst = max(worst, e.best / limit)
            violations += e.best > limit
        now_collapsed = all(m > s for m, s in zip(e.members, starting))
        collapses += now_collapsed and not collapsed
        collapsed = now_collapsed
    return Stability(halved_at, violations, worst, collapses, evals[-1].best, min(e.best for e in evals))


def ablation_table(runs: dict[str, list[Event]]) -> str:
    """One markdown row per run: time to beat Adam, collapses, final best."""
    lines = [
        "| run | minutes | inner steps (M) | first beat best fixed-lr Adam | first beat tuned Adam | collapses "
        "| criterion violations | lowest best | final best |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, events in runs.items():
        evals = of_type(events, Eval)
        result = stability(evals)
        beat_fixed, beat_tuned = (first_time_below(evals, k) for k in ("adam_best_fixed", "adam_tuned"))
        when = [f"{t / 60:.1f} min" if t is not None else "never" for t in (beat_fixed, beat_tuned)]
        # The training work the budget bought: what a mechanism's own cost in time took away.
        inner_steps = max((r.inner_steps for r in of_type(events, Round)), default=0)
        lines.append(
            f"| {name} | {evals[-1].elapsed / 60:.0f} | {inner_steps / 1e6:.1f} | {when[0]} | {when[1]} "
            f"| {result.collapses} | {result.violations} | {result.lowest_best:.3f} | {result.final_best:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("events", nargs="?", help="a run's events.jsonl, or its run directory")
    parser.add_argument("--plot", type=Path, help="write the history figure here (needs matplotlib)")
    parser.add_argument("--ablation", nargs="+", metavar="NAME=EVENTS", help="a markdown table over several runs")
    parser.add_argument("--minutes", type=float, help="read only the first MINUTES of run time of each log")
    args = parser.parse_args(argv)
    if args.ablation:
        runs = dict(item.split("=", 1) for item in args.ablation)
        print(ablation_table({name: within(read_events(path), args.minutes) for name, path in runs.items()}))
        return
    if not args.events:
        parser.error("give an events.jsonl or --ablation")
    events = within(read_events(args.events), args.minutes)
    print(summary(events))
    evals = of_type(events, Eval)
    if evals:
        result = stability(evals)
        halved = "never" if result.halved_at is None else f"at {result.halved_at:.0f} s"
        print(f"halved its starting loss: {halved}; evaluations above 1.5 x running min + 0.05 after that: "
              f"{result.violations} (worst {result.worst_excess:.2f} x the limit); collapses: {result.collapses}")
    if args.plot:
        from selfloop.observe.figures import PlotExtraMissing, history_figure

        try:
            history_figure(events, args.plot)
        except PlotExtraMissing as missing:
            parser.exit(2, f"error: --plot: {missing}\n")
        print(f"figure: {args.plot}")


if __name__ == "__main__":
    main()
