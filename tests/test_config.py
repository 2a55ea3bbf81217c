"""Configs: typed, validated, and a bad one stops before anything is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from selfloop.config import (
    ADDED_KEYS,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    saved_config_from_dict,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["paper", "smoke"])
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / f"{name}.toml")
    assert config_from_dict(config_to_dict(config)) == config


def test_the_defaults_are_one_valid_config_and_a_file_changes_only_what_it_says(tmp_path):
    defaults = load_config(None)
    assert defaults == Config() and config_from_dict(config_to_dict(defaults)) == defaults
    path = tmp_path / "partial.toml"
    path.write_text("[estimator]\npairs = 6\n")
    partial = config_to_dict(load_config(path))
    expected = config_to_dict(defaults)
    expected["estimator"]["pairs"] = 6
    assert partial == expected  # not the paper's sizes, not anything else


def test_a_saved_config_without_later_keys_means_what_it_meant_then():
    saved = config_to_dict(Config())
    for dotted in ADDED_KEYS:
        section, key = dotted.split(".")
        del saved[section][key]
    config = saved_config_from_dict(saved, "old.h5", ("run.max_minutes=5",))
    assert config.lopt.features == "per_tensor" and config.lopt.odd is False
    assert config.pbt.step_scale_factor == 1.0 and config.run.max_minutes == 5.0


def test_paper_config_has_the_papers_sizes():
    config = load_config(REPO / "configs" / "paper.toml")
    assert config.population.size == 10
    assert config.population.truncations == (200, 300, 400, 800)
    assert config.lopt.arch == "hierarchical" and config.lopt.lstm_hidden == 64
    assert config.pbt.tasks == 100 and config.eval.tasks == 100 and config.eval.steps == 10_000
    assert config.pbt.p_outer_redraw == 0.5 and config.pbt.p_truncation_redraw == 0.1


@pytest.mark.parametrize(
    "raw,fragment",
    [
        ({"population": {"sise": 10}}, "population.sise: unknown key"),
        ({"population": {"size": "ten"}}, "population.size: expected int"),
        ({"population": {"size": -3}}, "population.size: expected an integer >= 2"),
        ({"population": {"truncations": [200, 0]}}, "population.truncations: expected a non-empty list of positive"),
        ({"estimator": {"kind": "adam"}}, "estimator.kind: expected one of ['es', 'pes', 'grad']"),
        ({"pbt": {"p_outer_redraw": 1.5}}, "pbt.p_outer_redraw: expected a probability"),
        ({"estimator": {"std": float("inf")}}, "estimator.std: expected a finite positive number"),
        ({"run": {"max_minutes": float("nan")}}, "run.max_minutes: expected a finite number >= 0"),
        ({"run": {"dashboard": "fancy"}}, "run.dashboard: expected one of ['auto', 'live', 'plain']"),
        ({"run": {"checkpoint_dir": " "}}, "run.checkpoint_dir: expected a non-empty string"),
        ({"pbt": {"step_scale_factor": 0.5}}, "pbt.step_scale_factor: expected a finite number >= 1"),
        ({"tasks": {"families": ["quadratic", "imagenet"]}}, "tasks.families: expected a non-empty list drawn from"),
        ({"bogus": {}}, "unknown section [bogus]"),
        ({"lopt": {"features": "adam"}},
         "lopt.features: expected one of ['per_tensor', 'relative', 'adaptive', 'scaled']"),
        ({"lopt": {"arch": "hierarchical", "odd": True}}, "lopt.features / lopt.odd: only the mlp architecture"),
        ({"eval": {"unseen_families": ["imagenet"]}}, "eval.unseen_families: expected a list drawn from"),
        ({"eval": {"unseen_families": ["char_rnn"]}}, "eval.unseen_families: ['char_rnn'] also in tasks.families"),
        (
            {"population": {"truncations": [25]}, "estimator": {"chunk": 10}},
            "population.truncations: 25 is not a multiple",
        ),
    ],
)
def test_bad_values_name_the_key(raw, fragment):
    with pytest.raises(ConfigError, match=None) as error:
        config_from_dict(raw, "x.toml")
    assert fragment in str(error.value) and str(error.value).startswith("x.toml")


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[population]\nsize = 4\n")
    config = load_config(path, ("population.size=6", "estimator.kind=pes", "population.truncations=[50, 100]"))
    assert config.population.size == 6 and config.estimator.kind == "pes"
    assert config.population.truncations == (50, 100)


@pytest.mark.parametrize(
    "override,key",
    [
        ("population.sise=3", "population.sise"),
        ("population.size=-1", "population.size"),
        ("population.truncations=[0]", "population.truncations"),
        ("estimator.pairs=1.5", "estimator.pairs"),
    ],
)
def test_cli_rejects_bad_config_with_status_2_and_writes_nothing(tmp_path, override, key):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "run.py",
            "--config",
            "configs/smoke.toml",
            "--checkpoint-dir",
            str(run_dir),
            "--set",
            override,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert key in result.stderr
    assert not run_dir.exists()
