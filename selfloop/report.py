"""Plain reporter: one line per round, per PBT event and per evaluation.

For terminals that are not terminals (CI, nohup, pipes) and for ``--dashboard
plain``. Pure formatting of the event records; printing is the caller's.
"""

from __future__ import annotations

import sys
from typing import TextIO

import numpy as np


def _members(values) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def _unseen(scores: dict | None) -> str:
    """The unseen-families part of an eval line (empty when the run has none)."""
    if not scores:
        return ""
    return (f"  | unseen families best {scores['best']:.3f} (Adam best fixed {scores['adam_best_fixed']:.3f} "
            f"tuned {scores['adam_tuned']:.3f})")


def format_record(record: dict) -> str | None:
    """One line for an event record, or None for records not shown."""
    kind = record["kind"]
    if kind == "round":
        meta = np.asarray(record["meta_loss"], dtype=float)
        return (
            f"round {record['round']:5d}  {record['elapsed']:7.1f}s  meta-loss best {np.nanmin(meta):.3f} "
            f"mean {np.nanmean(meta):.3f}  inner steps {record['inner_steps']:,}"
            + (f"  rejected {record['rejected']}" if record["rejected"] else "")
        )
    if kind == "pbt":
        changes = []
        if record["outer_redrawn"]:
            changes.append(f"outer->m{record['outer_index']}")
        if record["truncation_redrawn"]:
            changes.append(f"K->{record['truncation']}")
        source = "the champion" if record.get("source") == "champion" else f"m{record['winner']}"
        champion = record.get("champion_score", float("nan"))
        challenge = record.get("confirm_winner_score", float("nan")), record.get("confirm_champion_score", float("nan"))
        if challenge[0] == challenge[0]:  # the winner challenged the champion on further tasks
            verdict = "replaced" if record.get("champion_replaced") else "kept"
            t = record.get("confirm_t", float("nan"))
            changes.append(f"champion {champion:.3f}, challenge {challenge[0]:.3f} vs {challenge[1]:.3f} "
                           f"(t {t:.1f}): {verdict}")
        elif champion == champion:  # not nan
            changes.append(f"champion {champion:.3f}" + (" replaced" if record.get("champion_replaced") else ""))
        elif record.get("champion_replaced"):
            changes.append("first champion")
        return (
            f"pbt   round {record['round']:5d}  m{record['winner']} ({record['winner_score']:.3f}) beat "
            f"m{record['loser']} ({record['loser_score']:.3f}): copied {source}"
            + (f"; {'; '.join(changes)}" if changes else "")
        )
    if kind == "rollback":
        return (
            f"guard round {record['round']:5d}  m{record['member']} diverged (smoothed meta-loss {record['ema']:.3f}, "
            f"best {record['best_ema']:.3f}): rolled back to its best snapshot, now trained by m{record['outer_index']}"
        )
    if kind == "rejected":
        return f"rail  round {record['round']:5d}  m{record['member']} outer step rejected: {record['reason']}"
    if kind == "unit_failed":
        return (
            f"farm  round {record['round']:5d}  unit m{record['member']}/slot {record['slot']} failed "
            f"after {record['attempts']} attempts"
        )
    if kind == "checkpoint":
        size, seconds = record["bytes"] / 1e6, record["seconds"]
        return f"ckpt  round {record['round']:5d}  {record['path']} ({size:.1f} MB, {seconds:.2f}s)"
    if kind == "resume":
        return f"resume from {record['path']} (round {record['round']}, {record['elapsed']:.0f}s of run time)"
    if kind == "checkpoint_skipped":
        return f"warning: skipped unreadable checkpoint {record['path']}: {record['error']}"
    if kind == "fresh":
        return f"fresh {record['message']}"
    if kind == "pbt_skipped":
        return f"pbt   round {record['round']:5d}  skipped: {record['reason']}"
    if kind == "eval":
        return (
            f"eval  round {record['round']:5d}  {record['elapsed']:7.1f}s  held-out best m{record['best_member']} "
            f"{record['best']:.3f}  | Adam best fixed {record['adam_best_fixed']:.3f} tuned {record['adam_tuned']:.3f}"
            + (f"  | champion {record['champion']:.3f}" if record.get("champion") is not None else "")
            + f"  | members {_members(record['members'])}"
            + _unseen(record.get("unseen"))
        )
    if kind == "progress":
        return f"...   {record['message']}"
    if kind == "reference":
        return (f"adam  on the held-out set: best fixed lr {record['adam_best_fixed']:.3f}, per-task tuned "
                f"{record['adam_tuned']:.3f}")
    if kind == "heldout_changed":
        return (f"note  round {record['round']}: eval.* changed on resume, so held-out scores start a new series "
                f"(set {record['after']}, was {record['before']})")
    if kind == "start":
        resumed = record.get("resumed_from")
        origin = "new population" if resumed is None else f"resumed from round {resumed}"
        return f"start {record.get('run_dir', '')}: {origin}, {len(record['heldout'])} held-out tasks"
    if kind == "end":
        return (
            f"end   round {record['round']}  {record['elapsed']:.1f}s  best held-out {record['start_best']:.3f} -> "
            f"{record['end_best']:.3f}  (Adam best fixed {record['adam_best_fixed']:.3f}, "
            f"tuned {record['adam_tuned']:.3f})"
        )
    return None


class PlainReporter:
    def __init__(self, stream: TextIO = sys.stdout):
        self.stream = stream

    def __call__(self, record: dict) -> None:
        line = format_record(record)
        if line is not None:
            print(line, file=self.stream, flush=True)
