"""Plain reporter: one line per round, per PBT event and per evaluation.

For terminals that are not terminals (CI, nohup, pipes) and for ``--dashboard
plain``. Pure formatting of the event records; printing is the caller's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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


def _last_line(text: str) -> str:
    """A traceback's last line: what went wrong."""
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(no message)"


def _round(record: dict) -> str:
    meta = np.asarray(record["meta_loss"], dtype=float)
    return (
        f"round {record['round']:5d}  {record['elapsed']:7.1f}s  meta-loss best {np.nanmin(meta):.3f} "
        f"mean {np.nanmean(meta):.3f}  inner steps {record['inner_steps']:,}"
        + (f"  rejected {record['rejected']}" if record["rejected"] else "")
    )


def _champion_part(record: dict) -> str | None:
    """What a tournament did to the champion (None: nothing to say)."""
    champion = record.get("champion_score", float("nan"))
    challenge = record.get("confirm_winner_score", float("nan")), record.get("confirm_champion_score", float("nan"))
    if challenge[0] == challenge[0]:  # the winner challenged the champion on further tasks
        verdict = "replaced" if record.get("champion_replaced") else "kept"
        t = record.get("confirm_t", float("nan"))
        return f"champion {champion:.3f}, challenge {challenge[0]:.3f} vs {challenge[1]:.3f} (t {t:.1f}): {verdict}"
    if champion == champion:  # not nan
        return f"champion {champion:.3f}" + (" replaced" if record.get("champion_replaced") else "")
    return "first champion" if record.get("champion_replaced") else None


def _pbt(record: dict) -> str:
    changes = []
    if record["outer_redrawn"]:
        changes.append(f"outer->m{record['outer_index']}")
    if record["truncation_redrawn"]:
        changes.append(f"K->{record['truncation']}")
    champion = _champion_part(record)
    if champion:
        changes.append(champion)
    source = "the champion" if record.get("source") == "champion" else f"m{record['winner']}"
    return (
        f"pbt   round {record['round']:5d}  m{record['winner']} ({record['winner_score']:.3f}) beat "
        f"m{record['loser']} ({record['loser_score']:.3f}): copied {source}"
        + (f"; {'; '.join(changes)}" if changes else "")
    )


def _eval(record: dict) -> str:
    return (
        f"eval  round {record['round']:5d}  {record['elapsed']:7.1f}s  held-out best m{record['best_member']} "
        f"{record['best']:.3f}  | Adam best fixed {record['adam_best_fixed']:.3f} tuned {record['adam_tuned']:.3f}"
        + (f"  | champion {record['champion']:.3f}" if record.get("champion") is not None else "")
        + f"  | members {_members(record['members'])}"
        + _unseen(record.get("unseen"))
    )


def _start(record: dict) -> str:
    resumed = record.get("resumed_from")
    origin = "new population" if resumed is None else f"resumed from round {resumed}"
    return f"start {record.get('run_dir', '')}: {origin}, {len(record['heldout'])} held-out tasks"


# One line per kind of record; kinds not here are not shown.
FORMATS: dict[str, Callable[[dict], str]] = {
    "round": _round,
    "pbt": _pbt,
    "eval": _eval,
    "start": _start,
    "rollback": lambda r: (
        f"guard round {r['round']:5d}  m{r['member']} diverged (smoothed meta-loss {r['ema']:.3f}, "
        f"best {r['best_ema']:.3f}): rolled back to its best snapshot, now trained by m{r['outer_index']}"
    ),
    "rejected": lambda r: f"rail  round {r['round']:5d}  m{r['member']} outer step rejected: {r['reason']}",
    "unit_failed": lambda r: (
        f"farm  round {r['round']:5d}  unit m{r['member']}/slot {r['slot']} failed after {r['attempts']} attempts"
    ),
    "checkpoint": lambda r: (
        f"ckpt  round {r['round']:5d}  {r['path']} ({r['bytes'] / 1e6:.1f} MB, {r['seconds']:.2f}s)"
    ),
    "resume": lambda r: f"resume from {r['path']} (round {r['round']}, {r['elapsed']:.0f}s of run time)",
    "checkpoint_skipped": lambda r: f"warning: skipped unreadable checkpoint {r['path']}: {r['error']}",
    "fresh": lambda r: f"fresh {r['message']}",
    "pbt_skipped": lambda r: f"pbt   round {r['round']:5d}  skipped: {r['reason']}",
    "eval_failed": lambda r: f"eval  round {r['round']:5d}  failed: {_last_line(r['error'])}",
    "progress": lambda r: f"...   {r['message']}",
    "reference": lambda r: (
        f"adam  on the held-out set: best fixed lr {r['adam_best_fixed']:.3f}, per-task tuned {r['adam_tuned']:.3f}"
    ),
    "heldout_changed": lambda r: (
        f"note  round {r['round']}: eval.* changed on resume, so held-out scores start a new series "
        f"(set {r['after']}, was {r['before']})"
    ),
    "end": lambda r: (
        f"end   round {r['round']}  {r['elapsed']:.1f}s  best held-out {r['start_best']:.3f} -> "
        f"{r['end_best']:.3f}  (Adam best fixed {r['adam_best_fixed']:.3f}, tuned {r['adam_tuned']:.3f})"
    ),
}


def format_record(record: dict) -> str | None:
    """One line for an event record, or None for records not shown."""
    format_line = FORMATS.get(record["kind"])
    return None if format_line is None else format_line(record)


class PlainReporter:
    def __init__(self, stream: TextIO = sys.stdout):
        self.stream = stream

    def __call__(self, record: dict) -> None:
        line = format_record(record)
        if line is not None:
            print(line, file=self.stream, flush=True)
