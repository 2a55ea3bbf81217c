"""Reading an event log back: the keep-its-gains criterion, collapses, the ablation table, the figure."""

from __future__ import annotations

import json

import pytest

from selfloop.events import read_events, surviving
from selfloop.history import ablation_table, main, stability, within


def _eval(elapsed, members, fixed=0.2, tuned=0.1):
    return {"kind": "eval", "elapsed": elapsed, "round": int(elapsed), "members": members, "best": min(members),
            "best_member": members.index(min(members)), "adam_best_fixed": fixed, "adam_tuned": tuned,
            "adam_fixed": [1.0] * 15}  # fmt: skip


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
    records = [_eval(0, [1.0, 1.2]), _eval(60, [0.15, 0.9]), _eval(120, [0.05, 0.4]),
               {"kind": "pbt", "elapsed": 30.0, "round": 30},
               {"kind": "round", "round": 40, "elapsed": 40.0, "inner_steps": 2_500_000},
               {"kind": "rollback", "round": 40, "member": 1}]  # fmt: skip
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n{torn")
    assert len(read_events(log)) == len(records)  # a torn last line is skipped
    assert read_events(tmp_path) == read_events(log)  # the run directory names its log
    table = ablation_table({"all": read_events(log)})
    assert "| all | 2 | 2.5 | 1.0 min | 2.0 min | 0 | 0 | 0.050 | 0.050 |" in table
    pytest.importorskip("matplotlib")
    main([str(log), "--plot", str(tmp_path / "history.png")])
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_what_a_crash_undid_is_not_counted_twice():
    """Rounds 11-12, a tournament and an evaluation were logged after the last
    checkpoint of a session that was then killed; the resume repeats them."""
    first = [{"kind": "start"}, {"kind": "round", "round": 10, "elapsed": 10.0},
             {"kind": "checkpoint", "round": 10, "elapsed": 10.0, "path": "checkpoint-000000010.h5"},
             {"kind": "round", "round": 11, "elapsed": 11.0}, {"kind": "pbt", "round": 11, "elapsed": 11.0},
             _eval(11.5, [0.9, 0.8]), {"kind": "round", "round": 12, "elapsed": 12.0}]  # fmt: skip
    second = [{"kind": "start"}, {"kind": "resume", "round": 10, "elapsed": 10.0, "path": "checkpoint-000000010.h5"},
              {"kind": "round", "round": 11, "elapsed": 11.2}, _eval(11.6, [0.7, 0.6])]  # fmt: skip
    kept = surviving(first + second)
    assert kept == first[:3] + second
    assert [r["best"] for r in kept if r["kind"] == "eval"] == [0.6]
    # The checkpoint record itself lost with the crash: cut by round instead.
    assert surviving(first[:2] + first[3:] + second) == first[:2] + second
    assert surviving(first) == first  # no resume: nothing to cut


def test_a_budget_keeps_the_final_evaluation_of_its_last_round():
    """A run stopped at 15 minutes evaluates its last round after the budget ran out;
    a longer run's later rounds stay out."""
    records = [_eval(0, [1.0, 1.2]), {"kind": "round", "round": 899, "elapsed": 899.0},
               {"kind": "round", "round": 900, "elapsed": 900.5},  # under way when the budget ran out
               _eval(900, [0.3, 0.4]) | {"elapsed": 912.0},
               {"kind": "round", "round": 901, "elapsed": 913.0},
               _eval(901, [0.2, 0.4]) | {"elapsed": 925.0}]  # fmt: skip
    kept = within(records, 15)
    assert [r["best"] for r in kept if r["kind"] == "eval"] == [1.0, 0.3]
    assert within(records, None) == records


def test_summary_counts_inner_steps_and_rail_use():
    from selfloop.history import inner_steps_at_evals, rail_use, summary

    def round_record(index, inner_steps, shortened, outer_steps=2):
        return {"kind": "round", "round": index, "elapsed": float(index), "meta_loss": [0.5, 0.6],
                "inner_steps": inner_steps, "shortened": shortened, "rejected": 0, "outer_steps": outer_steps}

    records = [_eval(0, [1.0, 1.1]), round_record(1, 1000, 2), round_record(2, 3000, 0, outer_steps=1),
               _eval(2, [0.5, 0.9]), round_record(3, 4000, 1)]
    assert inner_steps_at_evals(records) == [0, 3000]
    rails = rail_use(records)
    assert (rails.outer_steps, rails.shortened) == (5, 3) and rails.shortened_fraction == pytest.approx(0.6)
    assert "shortened by the step rail 60.0%" in summary(records)
