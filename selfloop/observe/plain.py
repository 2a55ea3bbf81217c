"""Plain reporter: one line per round, per PBT event and per evaluation.

For terminals that are not terminals (CI, nohup, pipes) and for ``--dashboard
plain``. Pure formatting of typed events (``selfloop.events``); printing is the
caller's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

import numpy as np

from selfloop import events as ev


def _members(values) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def _unseen(scores: ev.Scores | None) -> str:
    """The unseen-families part of an eval line (empty when the run has none)."""
    if scores is None:
        return ""
    return (f"  | unseen families best {scores.best:.3f} (Adam best fixed {scores.adam_best_fixed:.3f} "
            f"tuned {scores.adam_tuned:.3f})")


def _last_line(text: str) -> str:
    """A traceback's last line: what went wrong."""
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(no message)"


def _round(event: ev.Round) -> str:
    meta = np.asarray(event.meta_loss, dtype=float)
    return (
        f"round {event.round:5d}  {event.elapsed:7.1f}s  meta-loss best {np.nanmin(meta):.3f} "
        f"mean {np.nanmean(meta):.3f}  inner steps {event.inner_steps:,}"
        + (f"  rejected {event.rejected}" if event.rejected else "")
    )


def _champion_part(event: ev.Tournament) -> str | None:
    """What a tournament did to the champion (None: nothing to say)."""
    champion, challenger = event.champion_score, event.confirm_winner_score
    if event.champion_retired:
        return f"champion {champion:.3f} retired (record {event.champion_record:+.3f} against its pairs)"
    if challenger == challenger:  # not nan: the winner challenged the champion on further tasks
        verdict = "replaced" if event.champion_replaced else "kept"
        return (f"champion {champion:.3f}, challenge {challenger:.3f} vs {event.confirm_champion_score:.3f} "
                f"(t {event.confirm_t:.1f}): {verdict}")
    if champion == champion:
        return f"champion {champion:.3f}" + (" replaced" if event.champion_replaced else "")
    return "first champion" if event.champion_replaced else None


def _tournament(event: ev.Tournament) -> str:
    changes = []
    if event.outer_redrawn:
        changes.append(f"outer->m{event.outer_index}")
    if event.truncation_redrawn:
        changes.append(f"K->{event.truncation}")
    champion = _champion_part(event)
    if champion:
        changes.append(champion)
    source = "the champion" if event.source == "champion" else f"m{event.winner}"
    return (
        f"pbt   round {event.round:5d}  m{event.winner} ({event.winner_score:.3f}) beat "
        f"m{event.loser} ({event.loser_score:.3f}): copied {source}"
        + (f"; {'; '.join(changes)}" if changes else "")
    )


def _eval(event: ev.Eval) -> str:
    return (
        f"eval  round {event.round:5d}  {event.elapsed:7.1f}s  held-out best m{event.best_member} "
        f"{event.best:.3f}  | Adam best fixed {event.adam_best_fixed:.3f} tuned {event.adam_tuned:.3f}"
        + (f"  | champion {event.champion:.3f}" if event.champion is not None else "")
        + f"  | members {_members(event.members)}"
        + _unseen(event.unseen)
    )


def _start(event: ev.Start) -> str:
    origin = "new population" if event.resumed_from is None else f"resumed from round {event.resumed_from}"
    return f"start {event.run_dir}: {origin}, {len(event.heldout)} held-out tasks"


# One line per type of event; types not here are not shown.
FORMATS: dict[type[ev.Event], Callable] = {
    ev.Round: _round,
    ev.Tournament: _tournament,
    ev.Eval: _eval,
    ev.Start: _start,
    ev.Rollback: lambda e: (
        f"guard round {e.round:5d}  m{e.member} diverged (smoothed meta-loss {e.ema:.3f}, best {e.best_ema:.3f}): "
        f"rolled back to its best snapshot, now trained by m{e.outer_index}"
    ),
    ev.Rejected: lambda e: f"rail  round {e.round:5d}  m{e.member} outer step rejected: {e.reason}",
    ev.UnitFailed: lambda e: f"farm  round {e.round:5d}  unit m{e.member}/slot {e.slot} failed after {e.attempts} "
                             "attempts",
    ev.Checkpoint: lambda e: f"ckpt  round {e.round:5d}  {e.path} ({e.bytes / 1e6:.1f} MB, {e.seconds:.2f}s)",
    ev.Resume: lambda e: f"resume from {e.path} (round {e.round}, {e.elapsed:.0f}s of run time)",
    ev.CheckpointSkipped: lambda e: f"warning: skipped unreadable checkpoint {e.path}: {e.error}",
    ev.Fresh: lambda e: f"fresh {e.message}",
    ev.TournamentSkipped: lambda e: f"pbt   round {e.round:5d}  skipped: {e.reason}",
    ev.EvalFailed: lambda e: f"eval  round {e.round:5d}  failed: {_last_line(e.error)}",
    ev.Progress: lambda e: f"...   {e.message}",
    ev.Reference: lambda e: (
        f"adam  on the held-out set: best fixed lr {e.adam_best_fixed:.3f}, per-task tuned {e.adam_tuned:.3f}"
    ),
    ev.HeldoutChanged: lambda e: (
        f"note  round {e.round}: eval.* changed on resume, so held-out scores start a new series "
        f"(set {e.after}, was {e.before})"
    ),
    ev.TruncationsRedrawn: lambda e: (
        f"note  round {e.round}: population.truncations changed on resume, K redrawn for "
        + ", ".join(f"m{m} ({b} -> {a})" for m, b, a in zip(e.members, e.before, e.after))
    ),
    ev.MetaBatch: lambda e: (
        f"note  round {e.round}: meta-batch of {e.tasks} tasks per member on {e.workers} workers"
        + (f" (resized from {e.before})" if e.before and e.before != e.tasks else "")
    ),
    ev.End: lambda e: (
        f"end   round {e.round}  {e.elapsed:.1f}s  best held-out {e.start_best:.3f} -> {e.end_best:.3f}  "
        f"(Adam best fixed {e.adam_best_fixed:.3f}, tuned {e.adam_tuned:.3f})"
    ),
}


def format_event(event: ev.Event) -> str | None:
    """One line for an event, or None for types not shown."""
    format_line = FORMATS.get(type(event))
    return None if format_line is None else format_line(event)


class PlainReporter:
    def __init__(self, stream: TextIO = sys.stdout):
        self.stream = stream

    def __call__(self, event: ev.Event) -> None:
        line = format_event(event)
        if line is not None:
            print(line, file=self.stream, flush=True)
