"""Evaluation metrics on hand-made curves, and `run.py eval` end to end on a smoke run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from selfloop.evaluation.report import Curves, by_family, first_step_at_or_below, format_family_table, metrics, speedup
from tests.conftest import REPO


def test_speedup_is_how_much_sooner_a_common_level_is_reached():
    envelope = np.array([1.0, 0.8, 0.6, 0.4, 0.2])
    fast = np.array([1.0, 0.4, 0.2, 0.1, 0.1])
    assert first_step_at_or_below(envelope, 0.2) == 4 and first_step_at_or_below(fast, 0.2) == 2
    assert speedup(fast, envelope) == pytest.approx(4 / 2)  # level 0.2: envelope at step 4, fast at step 2
    slow = np.array([1.0, 0.9, 0.8, 0.7, 0.6])
    assert speedup(slow, envelope) == pytest.approx(2 / 4)  # level 0.6: envelope at step 2, slow at step 4


def test_metrics_on_hand_made_curves():
    adam_a = np.array([[1.0, 0.5, 0.3], [1.0, 0.9, 0.8]])  # [tasks, steps]
    adam_b = np.array([[1.0, 0.8, 0.6], [1.0, 0.4, 0.2]])
    tuned = np.stack([adam_a[0], adam_b[1]])  # per task, the rate with the lower mean
    member = np.array([[1.0, 0.2, 0.1], [1.0, 0.6, 0.5]])  # beats tuned on task 0 only
    curves = Curves({"m0": member, "adam lr=a": adam_a, "adam lr=b": adam_b, "adam tuned": tuned})
    table = metrics(curves, ["adam lr=a", "adam lr=b"])
    assert table["m0"]["mean"] == pytest.approx(member.mean())
    assert table["m0"]["final"] == pytest.approx(0.3)
    assert table["m0"]["beats_tuned"] == 0.5 and table["adam tuned"]["beats_tuned"] == 0.0
    assert table["adam tuned"]["final"] == pytest.approx(0.25)


def test_by_family_separates_what_the_overall_mean_hides():
    adam_a = np.array([[1.0, 0.5, 0.3], [1.0, 0.9, 0.8], [1.0, 0.5, 0.3]])  # [tasks, steps]
    adam_b = np.array([[1.0, 0.8, 0.6], [1.0, 0.4, 0.2], [1.0, 0.8, 0.6]])  # worse overall, better on "rnn"
    member = np.array([[1.0, 0.2, 0.1], [1.0, 1.0, 1.0], [1.0, 0.2, 0.1]])  # wins on "mlp", loses on "rnn"
    tuned = np.stack([adam_a[0], adam_b[1], adam_a[2]])
    curves = Curves({"m0": member, "adam lr=a": adam_a, "adam lr=b": adam_b, "adam tuned": tuned})
    table = by_family(curves, ["mlp", "rnn", "mlp"], ["adam lr=a", "adam lr=b"])
    assert list(table) == ["mlp", "rnn"]
    assert table["mlp"]["m0"] == pytest.approx(member[[0, 2]].mean())
    assert table["rnn"]["m0"] == pytest.approx(1.0)
    assert table["rnn"]["adam best fixed"] == pytest.approx(adam_a[1].mean())  # the rate best over all tasks
    assert table["rnn"]["adam tuned"] == pytest.approx(adam_b[1].mean())
    text = format_family_table(table, ["m0"])
    assert text.splitlines()[2].split() == ["rnn", "1.000", f"{adam_a[1].mean():.3f}", f"{adam_b[1].mean():.3f}"]


def test_eval_command_writes_figure_tables_and_caches_adam(tmp_path, compile_cache):
    run_dir = tmp_path / "run"
    common = ["--config", "configs/smoke.toml", "--checkpoint-dir", str(run_dir),
              "--set", f"farm.compile_cache={compile_cache!r}"]  # fmt: skip
    train = subprocess.run([sys.executable, "run.py", *common, "--max-rounds", "2"], cwd=REPO,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    evaluate = [sys.executable, "run.py", "eval", *common, "--tasks", "3", "--steps", "30"]
    result = subprocess.run(evaluate, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = run_dir / "eval-r2-E3-T30"
    results = json.loads((out / "results.json").read_text())
    assert len(results["tasks"]) == 3 and results["label"] == "r2"
    names = set(results["metrics"])
    assert {"m0", "m1", "m2", "m3", "adam tuned"} <= names and len([n for n in names if "lr=" in n]) == 15
    assert all(len(curve) == 31 for curve in results["mean_curves"].values())
    assert set(results["by_family"]) == {task.split("[")[0] for task in results["tasks"]}
    assert (out / "figure2.png").read_bytes()[:4] == b"\x89PNG" and (out / "metrics.csv").exists()
    assert len(list(run_dir.glob("adam_reference_*.npz"))) == 2  # training's held-out set and this one, cached
    with np.load(out / "task_curves.npz") as task_curves:
        assert task_curves["task_families"].tolist() == results["task_families"]
        assert task_curves["curve/m0"].shape == (3, 31)
        np.testing.assert_allclose(task_curves["curve/m0"].mean(axis=0), results["mean_curves"]["m0"], atol=1e-6)
    profile = subprocess.run([sys.executable, "bench/family_curves.py", str(out), "--steps", "0,30"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert profile.returncode == 0, profile.stderr[-3000:]
    all_m0 = next(line for line in profile.stdout.splitlines() if line.startswith("| all | m0 |"))
    assert all_m0.split("|")[3:6] == [" 1.000 ", f" {results['mean_curves']['m0'][30]:.3f} ",
                                      f" {np.mean(results['mean_curves']['m0']):.3f} "]
