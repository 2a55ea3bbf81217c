"""Reading an event log back: the keep-its-gains criterion, collapses, the ablation table, the figure."""

from __future__ import annotations

import json

import pytest

from selfloop.history import ablation_table, main, read_events, stability


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
               {"kind": "pbt", "elapsed": 30.0, "round": 30}, {"kind": "round", "round": 40, "elapsed": 40.0},
               {"kind": "rollback", "round": 40, "member": 1}]  # fmt: skip
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n{torn")
    assert len(read_events(log)) == len(records)  # a torn last line is skipped
    table = ablation_table({"all": read_events(log)})
    assert "| all | 2 | 1.0 min | 2.0 min | 0 | 0 | 0.050 | 0.050 |" in table
    pytest.importorskip("matplotlib")
    main([str(log), "--plot", str(tmp_path / "history.png")])
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
