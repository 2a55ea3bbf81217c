"""Runs side by side, on the wall-clock and on the inner-steps axes.

Reads each run's ``events.jsonl`` and prints, per run, the best member's
held-out loss at the last evaluation made within each run-time budget,
within each inner-step budget and within each round budget (``--rounds``:
a round is every member's outer step), the run's lowest, and how often the
step rail shortened an outer step. Label runs ``variant:seed`` so that paired seeds
line up; a final table gives, per budget, each variant's median over its
seeds and the spread between seeds.

    python bench/compare_runs.py base:0=checkpoints/base-s0 relodd:0=checkpoints/relodd-s0 \\
        --minutes 5,10,15,30 --inner 1,2,4
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from selfloop.events import Eval, Event, Round, of_type, read_events
from selfloop.observe.history import inner_steps_at_evals, rail_use


def best_within(events: list[Event], minutes: float | None = None, inner_millions: float | None = None,
                rounds: int | None = None) -> float:
    """The best member at the last evaluation inside the budget (nan: none yet, or the run
    stopped before it had used the budget)."""
    evals = of_type(events, Eval)
    steps = inner_steps_at_evals(events)
    if (minutes is not None and evals[-1].elapsed < 60.0 * minutes - 30.0) or (
        inner_millions is not None and steps[-1] < inner_millions * 1e6
    ) or (rounds is not None and evals[-1].round < rounds):
        return float("nan")
    inside = [e.best for e, s in zip(evals, steps)
              if (minutes is None or e.elapsed <= 60.0 * minutes + 30.0)
              and (inner_millions is None or s <= inner_millions * 1e6)
              and (rounds is None or e.round <= rounds)]  # fmt: skip
    return inside[-1] if inside else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="variant:seed=RUN_DIR")
    parser.add_argument("--minutes", default="5,10,15,30")
    parser.add_argument("--inner", default="1,2,4", help="inner-step budgets, millions")
    parser.add_argument("--rounds", default="", help="round budgets (a round is every member's outer step)")
    args = parser.parse_args()
    minutes = [float(m) for m in args.minutes.split(",")]
    inner = [float(m) for m in args.inner.split(",")]
    round_budgets = [int(r) for r in args.rounds.split(",") if r]
    columns = ([f"{m:g} min" for m in minutes] + [f"{m:g} M steps" for m in inner]
               + [f"round {r:,}" for r in round_budgets])
    print("| run | " + " | ".join(columns) + " | lowest | minutes run | inner M | rail shortened | ĝ clipped |")
    print("|---" * (len(columns) + 6) + "|")
    by_variant: dict[str, list[list[float]]] = {}
    for spec in args.runs:
        label, run_dir = spec.split("=", 1)
        events = read_events(Path(run_dir) / "events.jsonl")
        evals, rounds, rails = of_type(events, Eval), of_type(events, Round), rail_use(events)
        values = ([best_within(events, minutes=m) for m in minutes]
                  + [best_within(events, inner_millions=m) for m in inner]
                  + [best_within(events, rounds=r) for r in round_budgets])
        by_variant.setdefault(label.split(":")[0], []).append(values)
        print(f"| {label} | " + " | ".join(f"{v:.3f}" if v == v else "-" for v in values)
              + f" | {min(e.best for e in evals):.3f} | {evals[-1].elapsed / 60:.1f} | "
              f"{rounds[-1].inner_steps / 1e6:.2f} | {rails.shortened_fraction:.1%} | "
              + (f"{rails.clipped_fraction:.1%} |" if rails.estimates else "- |"))
    print("\n| variant (seeds) | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for variant, rows in by_variant.items():
        cells = []
        for column in zip(*rows):
            finite = [v for v in column if v == v]
            spread = f" ±{(max(finite) - min(finite)) / 2:.3f}" if len(finite) > 1 else ""
            cells.append(f"{statistics.median(finite):.3f}{spread}" if finite else "-")
        print(f"| {variant} ({len(rows)}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
