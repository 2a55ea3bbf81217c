"""Where a run's long outer steps come from: its proposals by member age, outer
optimizer age, truncation and minute, from the events log's ``Round.step_ratios``;
in logs that record them, also by rounds since one of the member's slots
started a new task (``Round.replaced_by_member``) and by the size of the
member's meta-gradient estimate against the round's median
(``Round.estimate_norms``).

    python bench/outer_steps.py RUN [RUN ...] [--rail 0.02]

Per group: how many member-steps, the share of proposals above the rail, and
the proposals' median and 90th percentile (% of ‖θ‖); then how persistent a
long proposal is (the chance the member's next step is long too).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import numpy as np

from selfloop.events import Round, of_type, read_events


class Proposals(NamedTuple):
    """One row per member-step that proposed a step (columns of equal length)."""

    round: np.ndarray
    minute: np.ndarray
    member: np.ndarray
    ratio: np.ndarray  # proposed ‖Δθ‖/‖θ‖
    age: np.ndarray  # the member's outer steps since its weights were copied
    outer_age: np.ndarray  # the same for its outer optimizer
    truncation: np.ndarray
    task_age: np.ndarray  # rounds since one of the member's slots started a new task (nan: not recorded)
    estimate_size: np.ndarray  # the member's ‖ĝ‖ over the round's median member ‖ĝ‖ (nan: not recorded)


def proposals(run: Path) -> Proposals:
    rows, last_new_task = [], {}
    for r in of_type(read_events(run), Round):
        for i, replaced in enumerate(r.replaced_by_member):
            if replaced:
                last_new_task[i] = r.round
        norms = np.asarray(r.estimate_norms, dtype=np.float64)
        median = np.nanmedian(norms) if norms.size and np.isfinite(norms).any() else np.nan
        for i, ratio in enumerate(r.step_ratios):
            if np.isfinite(ratio):
                task_age = r.round - last_new_task[i] if i in last_new_task else np.nan
                size = norms[i] / median if norms.size and median > 0 else np.nan
                rows.append((r.round, r.elapsed / 60, i, ratio, r.age[i], r.age[r.outer_index[i]], r.truncation[i],
                             task_age, size))
    if not rows:
        raise SystemExit(f"{run}: no Round records with step_ratios (logs from before they were recorded)")
    return Proposals(*np.array(rows, dtype=np.float64).T)


GROUPS = (
    ("member age", "age", (3, 10, 30, 100)),
    ("outer optimizer's age", "outer_age", (3, 10, 30, 100)),
    ("K", "truncation", (25, 35, 50)),
    ("minute", "minute", (5, 10, 15, 20, 25)),
    ("rounds since a new task", "task_age", (1, 4, 11, 31)),
    ("‖ĝ‖ / the round's median", "estimate_size", (0.5, 2, 4, 10)),
)


def _label(edges: tuple[float, ...], b: int) -> str:
    if b == 0:
        return f"< {edges[0]:g}"
    return f">= {edges[-1]:g}" if b == len(edges) else f"{edges[b - 1]:g}-{edges[b]:g}"


def persistence(p: Proposals, long: np.ndarray) -> tuple[float, float]:
    """P(next step long | this one long), P(next step long | this one not)."""
    order = np.lexsort((p.round, p.member))
    member, rnd, long = p.member[order], p.round[order], long[order]
    consecutive = (member[1:] == member[:-1]) & (rnd[1:] == rnd[:-1] + 1)
    now, then = long[:-1][consecutive], long[1:][consecutive]
    return float(then[now].mean()) if now.any() else np.nan, float(then[~now].mean()) if (~now).any() else np.nan


def report(run: Path, rail: float) -> None:
    p = proposals(run)
    long = p.ratio > rail
    q = np.percentile(p.ratio, (50, 90, 99, 100)) * 100
    print(f"\n## {run}: {len(p.ratio)} member-steps, {100 * long.mean():.1f} % above the {100 * rail:g} % rail; "
          f"proposals p50 / p90 / p99 / max {' / '.join(f'{x:.2f}' for x in q)} % of |theta|")
    for title, column, edges in GROUPS:
        values = getattr(p, column)
        if not np.isfinite(values).any():
            continue  # not recorded in this log
        bins = np.where(np.isfinite(values), np.digitize(values, edges), -1)
        print(f"\n| {title} | member-steps | above the rail | median | p90 |\n|---|---|---|---|---|")
        for b in range(len(edges) + 1):
            m = bins == b
            if m.any():
                print(f"| {_label(edges, b)} | {m.sum()} | {100 * long[m].mean():.1f} % | "
                      f"{100 * np.median(p.ratio[m]):.2f} % | {100 * np.percentile(p.ratio[m], 90):.2f} % |")
    after_long, after_short = persistence(p, long)
    print(f"\nnext step above the rail: {100 * after_long:.1f} % after one above it, "
          f"{100 * after_short:.1f} % after one below")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--rail", type=float, default=0.02, help="population.max_step_ratio of the runs")
    args = parser.parse_args()
    for run in args.runs:
        report(run, args.rail)


if __name__ == "__main__":
    main()
