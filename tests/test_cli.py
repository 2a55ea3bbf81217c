"""``python run.py`` end to end on the smoke config."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from selfloop.events import from_record

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "run.py", "--config", "configs/smoke.toml", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_smoke_run_writes_every_kind_of_event_resumes_and_starts_fresh_on_request(tmp_path, compile_cache):
    def _run_in(*args: str) -> subprocess.CompletedProcess:
        return _run("--compile-cache", compile_cache, *args)

    run_dir = tmp_path / "run"
    # A clip at the median shortens the longer half of each round's estimates: the option reaches the round.
    # Gradients as backpropagated: unit-length ones tie at the median, and a clip then hangs on rounding.
    result = _run_in("--checkpoint-dir", str(run_dir), "--dashboard", "plain",
                     "--set", "estimator.outlier_clip=1", "--set", "estimator.grad_weight='none'")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [from_record(json.loads(line)) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    kinds = [r.kind for r in records]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("round") == 4 and "pbt" in kinds and kinds.count("eval") >= 2
    for r in (r for r in records if r.kind == "round"):  # every stepped member's proposal, nan for the rest
        assert len(r.step_ratios) == len(r.meta_loss) and sum(map(math.isfinite, r.step_ratios)) == r.outer_steps
        assert sum(map(math.isfinite, r.estimate_norms)) == r.outer_steps == r.estimates  # one task a member
        assert 1 <= r.clipped_estimates < r.estimates
        assert len(r.replaced_by_member) == len(r.meta_loss) and sum(r.replaced_by_member) == r.replaced_tasks
    pbt = next(json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()
               if '"kind": "pbt"' in line)  # fmt: skip
    assert {
        "time",
        "round",
        "winner",
        "loser",
        "winner_score",
        "loser_score",
        "copied",
        "outer_redrawn",
        "truncation_redrawn",
    } <= set(pbt)
    assert "pbt   round" in result.stdout and "eval  round" in result.stdout

    assert "checkpoint" in kinds and (run_dir / "checkpoint-000000004.h5").exists()

    # The same directory again resumes from round 4 (max_rounds counts the whole run).
    again = _run_in("--checkpoint-dir", str(run_dir), "--max-rounds", "6")
    assert again.returncode == 0, again.stderr[-3000:]
    records = [from_record(json.loads(line)) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [r.round for r in records if r.kind == "resume"] == [4]
    assert records[-1].kind == "end" and records[-1].round == 6

    fresh = _run_in("--checkpoint-dir", str(run_dir), "--fresh", "--max-rounds", "1")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    (previous,) = run_dir.glob("previous-*")  # the first run is kept whole, not overwritten
    assert (previous / "events.jsonl").exists() and (previous / "checkpoint-000000006.h5").exists()
    records = [from_record(json.loads(line)) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert "resume" not in [r.kind for r in records] and records[-1].round == 1


def test_seed_changes_the_run(tmp_path):
    """``--seed`` reaches every random draw a run makes from it: the initial
    weights, outer pairings and truncations, the slots' tasks, the ES noise keys.
    (In process: a run's rounds add nothing here but minutes of compiling.)"""
    import jax
    import jax.flatten_util
    import numpy as np

    from selfloop.cli import build_parser, resolve_config
    from selfloop.farm.units import unit_key
    from selfloop.master.population import init_population

    def population(seed: int):
        args = build_parser().parse_args(["--config", "configs/smoke.toml", "--seed", str(seed),
                                          "--checkpoint-dir", str(tmp_path / f"s{seed}")])  # fmt: skip
        config = resolve_config(args)
        assert config.run.seed == seed
        return config, init_population(config)

    (config_1, first), (config_2, second) = population(1), population(2)
    weights = [jax.flatten_util.ravel_pytree(members[0].theta)[0] for members in (first, second)]
    assert not np.allclose(*weights)
    draws = [[(m.outer_index, m.truncation, *(slot.spec for slot in m.slots)) for m in members]
             for members in (first, second)]  # fmt: skip
    assert draws[0] != draws[1]
    assert not np.array_equal(unit_key(config_1.run.seed, 3, 0, 0), unit_key(config_2.run.seed, 3, 0, 0))


def test_eval_refuses_an_unknown_family_with_status_2(tmp_path):
    from selfloop.cli import main

    status = main(["eval", "--config", "configs/smoke.toml", "--checkpoint-dir", str(tmp_path / "run"),
                   "--families", "quadratic,imagenet"])
    assert status == 2 and not (tmp_path / "run").exists()
