"""Reading an event log back: the keep-its-gains criterion, collapses, the ablation table, the figure."""

from __future__ import annotations

import json

import numpy as np
import pytest

from selfloop.events import (
    Checkpoint,
    Eval,
    Resume,
    Rollback,
    Round,
    Start,
    Tournament,
    read_events,
    surviving,
    to_record,
)
from selfloop.observe.history import ablation_table, main, stability, within


def _eval(elapsed, members, fixed=0.2, tuned=0.1, round_index=None):
    return Eval(members=tuple(members), best=min(members), champion=None, adam_fixed=(1.0,) * 15,
                adam_best_fixed=fixed, adam_tuned=tuned, round=int(elapsed) if round_index is None else round_index,
                elapsed=elapsed, best_member=members.index(min(members)), members_final=tuple(members))  # fmt: skip


def _round(index, elapsed=None, inner_steps=0, shortened=0, outer_steps=2, step_ratios=()):
    return Round(round=index, elapsed=float(index) if elapsed is None else elapsed, meta_loss=(0.5, 0.6),
                 outer_index=(1, 0), truncation=(20, 20), steps=(index, index), age=(0, 0), outer_steps=outer_steps,
                 shortened=shortened, inner_steps=inner_steps, step_ratios=step_ratios)  # fmt: skip


def _tournament(index, elapsed):
    return Tournament(time=0.0, round=index, winner=0, loser=1, winner_score=0.2, loser_score=0.3, copied=("theta",),
                      outer_redrawn=False, outer_index=0, truncation_redrawn=False, truncation=20, elapsed=elapsed)


START = Start(config={}, heldout=())


def test_a_run_that_keeps_its_gains():
    evals = [_eval(0, [1.0, 1.2]), _eval(90, [0.45, 1.1]), _eval(180, [0.3, 0.5]), _eval(270, [0.4, 0.9])]
    result = stability(evals)
    assert result.halved_at == 90 and result.violations == 0 and result.collapses == 0
    assert result.final_best == 0.4 and result.lowest_best == 0.3
    assert result.worst_excess == pytest.approx(0.4 / (1.5 * 0.3 + 0.05))


def test_a_collapse_is_counted_once_per_episode_and_violates_the_criterion():
    evals = [
        _eval(0, [1.0, 1.2]),
        _eval(90, [0.2, 0.9]),
        _eval(180, [1.3, 1.4]),  # every member above its own start: collapse 1
        _eval(270, [1.4, 1.5]),  # still the same collapse
        _eval(360, [0.3, 1.5]),
        _eval(450, [1.1, 1.3]),  # collapse 2
    ]
    result = stability(evals)
    assert result.collapses == 2 and result.violations == 3  # limit 1.5*0.2+0.05 = 0.35


def test_ablation_table_and_cli_figure(tmp_path):
    log = tmp_path / "events.jsonl"
    records = [_eval(0, [1.0, 1.2]), _eval(60, [0.15, 0.9]), _eval(120, [0.05, 0.4]), _tournament(30, 30.0),
               _round(40, inner_steps=2_500_000), Rollback(40, member=1, ema=1.1, best_ema=0.4, outer_index=0)]
    log.write_text("\n".join(json.dumps(to_record(r)) for r in records) + "\n{torn")
    as_json = lambda events: [json.dumps(to_record(e)) for e in events]  # noqa: E731 (nan != nan in ==)
    assert as_json(read_events(log)) == as_json(records)  # a torn last line is skipped
    assert as_json(read_events(tmp_path)) == as_json(records)  # the run directory names its log
    table = ablation_table({"all": read_events(log)})
    assert "| all | 2 | 2.5 | 1.0 min | 2.0 min | 0 | 0 | 0.050 | 0.050 |" in table
    pytest.importorskip("matplotlib")
    main([str(log), "--plot", str(tmp_path / "history.png")])
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_what_a_crash_undid_is_not_counted_twice():
    """Rounds 11-12, a tournament and an evaluation were logged after the last
    checkpoint of a session that was then killed; the resume repeats them."""
    first = [START, _round(10), Checkpoint(10, 10.0, "checkpoint-000000010.h5", seconds=0.1, bytes=1),
             _round(11), _tournament(11, 11.0), _eval(11.5, [0.9, 0.8]), _round(12)]  # fmt: skip
    second = [START, Resume(10, 10.0, "checkpoint-000000010.h5"), _round(11, elapsed=11.2), _eval(11.6, [0.7, 0.6])]
    kept = surviving(first + second)
    assert kept == first[:3] + second
    assert [r.best for r in kept if isinstance(r, Eval)] == [0.6]
    # The checkpoint record itself lost with the crash: cut by round instead.
    assert surviving(first[:2] + first[3:] + second) == first[:2] + second
    assert surviving(first) == first  # no resume: nothing to cut


def test_a_budget_keeps_the_final_evaluation_of_its_last_round():
    """A run stopped at 15 minutes evaluates its last round after the budget ran out;
    a longer run's later rounds stay out."""
    records = [_eval(0, [1.0, 1.2]), _round(899),
               _round(900, elapsed=900.5),  # under way when the budget ran out
               _eval(912.0, [0.3, 0.4], round_index=900),
               _round(901, elapsed=913.0),
               _eval(925.0, [0.2, 0.4], round_index=901)]  # fmt: skip
    kept = within(records, 15)
    assert [r.best for r in kept if isinstance(r, Eval)] == [1.0, 0.3]
    assert within(records, None) == records


def test_summary_counts_inner_steps_and_rail_use():
    from selfloop.observe.history import inner_steps_at_evals, rail_use, summary

    records = [_eval(0, [1.0, 1.1]), _round(1, inner_steps=1000, shortened=2),
               _round(2, inner_steps=3000, outer_steps=1), _eval(2, [0.5, 0.9]),
               _round(3, inner_steps=4000, shortened=1)]
    assert inner_steps_at_evals(records) == [0, 3000]
    rails = rail_use(records)
    assert (rails.outer_steps, rails.shortened) == (5, 3) and rails.shortened_fraction == pytest.approx(0.6)
    assert "shortened by the step rail 60.0%" in summary(records)
    assert rails.proposed == () and "percentile" not in summary(records)  # an older log: no per-member ratios


def test_rail_use_reads_the_tail_of_the_members_proposed_steps():
    from selfloop.observe.history import rail_use, summary

    # 100 stepped proposals 0.001..0.100 (a member not stepped is nan, and not counted).
    ratios = [(0.001 * i, 0.001 * (i + 50)) for i in range(1, 51)]
    records = [_eval(0, [1.0, 1.1])] + [_round(i + 1, step_ratios=r) for i, r in enumerate(ratios)]
    records.append(_round(51, outer_steps=1, step_ratios=(float("nan"), 0.5)))
    proposed = rail_use(records).proposed
    assert proposed == pytest.approx(np.percentile([*np.arange(1, 101) * 0.001, 0.5], [50, 90, 99]))
    assert "99th percentile" in summary(records)


def test_a_log_with_unknown_kinds_and_incomplete_records_reads_what_it_can(tmp_path, capsys):
    log = tmp_path / "events.jsonl"
    kept = _eval(0, [1.0, 1.2])
    log.write_text("\n".join([json.dumps(to_record(kept)), '{"kind": "from_a_later_version", "x": 1}',
                              '{"kind": "round", "round": 3}', "[1, 2]"]) + "\n")  # fmt: skip
    (event,) = read_events(log)
    assert event.best == kept.best and event.members == kept.members
    warnings = capsys.readouterr().err
    assert f"{log}:3: skipping an unreadable line (a 'round' record" in warnings and f"{log}:4:" in warnings
    assert ":2:" not in warnings  # a kind this version does not know is passed over quietly
