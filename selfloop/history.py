"""Reading a run's ``events.jsonl`` back: what the numbers in BENCHMARKS.md come from.

python -m selfloop.history checkpoints/default/events.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from selfloop.baselines import ADAM_LEARNING_RATES


def read_events(path: str | Path) -> list[dict]:
    """Every record of an event log, in order (a torn last line is skipped)."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path}:{number}: skipping an unreadable line", file=sys.stderr)
    return records


def first_time_below(evals: list[dict], threshold_key: str) -> float | None:
    """Elapsed seconds of the first evaluation whose best member beat ``threshold_key``."""
    return next((e["elapsed"] for e in evals if e["best"] < e[threshold_key]), None)


def summary(records: list[dict]) -> str:
    """A plain-text table of the held-out evaluations of one run."""
    evals = [r for r in records if r["kind"] == "eval"]
    if not evals:
        return "no evaluations in this log"
    lines = [f"{'round':>6} {'elapsed s':>10} {'best member':>12} {'best loss':>10} {'median':>8}"]
    for e in evals:
        members = sorted(e["members"])
        lines.append(
            f"{e['round']:>6} {e['elapsed']:>10.1f} {'m' + str(e['best_member']):>12} "
            f"{e['best']:>10.3f} {members[len(members) // 2]:>8.3f}"
        )
    first, last = evals[0], evals[-1]
    lines.append("")
    lines.append(
        f"best member, held-out mean normalized loss: start {first['best']:.3f} -> end {last['best']:.3f} "
        f"(x{first['best'] / max(last['best'], 1e-12):.2f} lower); lowest seen {min(e['best'] for e in evals):.3f}"
    )
    lines.append("Adam on the same tasks (mean normalized loss):")
    for rate, value in zip(ADAM_LEARNING_RATES, last["adam_fixed"]):
        lines.append(f"  lr {rate:<8.2g} {value:.3f}")
    lines.append(f"  best fixed lr {last['adam_best_fixed']:.3f}   per-task tuned {last['adam_tuned']:.3f}")
    for label, key in (("best fixed-lr Adam", "adam_best_fixed"), ("per-task tuned Adam", "adam_tuned")):
        when = first_time_below(evals, key)
        lines.append(f"first beat {label}: " + (f"{when:.0f} s" if when is not None else "not within this run"))
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(read_events(sys.argv[1])))
