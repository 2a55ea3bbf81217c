"""No hand-designed optimizer is on the self-training path.

Two proofs: (1) rounds and PBT tournaments run in a process where importing
optax raises; (2) after a round every θ is bit-for-bit what the outer
optimizer's lopt update produces from the round's snapshot and meta-gradient.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from selfloop.farm.units import run_unit
from selfloop.lopt import make_lopt
from selfloop.master.population import (
    OuterSettings,
    apply_outer_steps,
    init_population,
    mean_gradient,
    outer_settings,
    outer_time_limit,
)
from selfloop.master.trainer import Trainer, absorb_results, make_units
from selfloop.state import RunState

REPO = Path(__file__).resolve().parent.parent

# The modules whose code runs when members train each other.
SELF_TRAINING_MODULES = (
    "selfloop/lopt/base.py",
    "selfloop/lopt/mlp.py",
    "selfloop/lopt/__init__.py",
    "selfloop/estimators.py",
    "selfloop/unroll.py",
    "selfloop/master/population.py",
    "selfloop/master/pbt.py",
    "selfloop/farm/units.py",
    *(str(p.relative_to(REPO)) for p in (REPO / "selfloop" / "tasks").glob("*.py")),
)
HAND_DESIGNED = ("adam", "sgd", "rmsprop", "adagrad", "lamb", "lion", "momentum_sgd")


def test_self_training_modules_neither_import_optax_nor_define_rules():
    for relative in SELF_TRAINING_MODULES:
        tree = ast.parse((REPO / relative).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "optax" for a in node.names), relative
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in ("optax", "selfloop.evaluation.baselines"), relative
                assert node.module != "selfloop.evaluation.baselines", relative
            if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.Assign):
                names = (
                    [node.name]
                    if hasattr(node, "name")
                    else [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
                )
                for name in names:
                    assert not any(rule in name.lower() for rule in HAND_DESIGNED), f"{relative}: {name}"


BLOCKED_RUN = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "optax" or name.startswith("optax.") or name == "selfloop.evaluation.baselines":
            raise ImportError(f"{name} is blocked on the self-training path")
sys.meta_path.insert(0, Block())
import jax, numpy as np
from pathlib import Path
from selfloop.config import load_config
from selfloop.master.trainer import Trainer
config = load_config("configs/smoke.toml", (f"farm.compile_cache={sys.argv[2]!r}",))
trainer = Trainer(config, Path(sys.argv[1]), report=lambda record: None)
state = trainer.new_state()
before = [m.theta for m in state.members]
for _ in range(3):
    trainer.run_round(state)
state.last_pbt_time = -1e9
trainer.run_if_due("pbt", state)
moved = sum(any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(m.theta),
            jax.tree_util.tree_leaves(t))) for m, t in zip(state.members, before))
assert state.pbt_events == 1
assert "optax" not in sys.modules
print("MOVED", moved)
"""


def test_rounds_and_pbt_run_with_optax_unimportable(tmp_path, compile_cache):
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, str(tmp_path), compile_cache],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MOVED 4" in result.stdout  # every member's θ changed


def test_theta_changes_only_through_the_outer_lopt(smoke_config, tmp_path):
    import dataclasses

    config = dataclasses.replace(
        smoke_config, population=dataclasses.replace(smoke_config.population, max_step_ratio=0.0)
    )
    trainer = Trainer(config, tmp_path, report=lambda record: None)
    state = RunState(members=init_population(config))
    snapshot = [(m.theta, m.outer_state, m.outer_index) for m in state.members]
    results = [run_unit(trainer.context, unit) for unit in make_units(state)]
    gradients = absorb_results(state, results, config.estimator)
    apply_outer_steps(state.members, gradients, trainer.lopt, outer_settings(config))
    update = jax.jit(trainer.lopt.update)
    step_mult = config.population.outer_step_mult  # the outer role's step size, a constant of the run
    for i, member in enumerate(state.members):
        theta, outer_state, outer_index = snapshot[i]
        proposed, _ = update(snapshot[outer_index][0], theta, mean_gradient(gradients[i]), outer_state)
        expected = jax.tree_util.tree_map(lambda t, p: t + step_mult * (p - t), theta, proposed)
        for a, b in zip(jax.tree_util.tree_leaves(member.theta), jax.tree_util.tree_leaves(expected)):
            # Up to float32 rounding of θ + m·(θ' - θ), which the outer step computes.
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_outer_time_stops_at_the_inner_horizon_when_clamped(smoke_config):
    """The outer optimizer's step count (its time features) stops at
    tasks.horizon_max, the longest time it ever learned on, unless disabled."""
    lopt = make_lopt(smoke_config.lopt)
    counts = {}
    for limit in (3, 0):
        members = init_population(smoke_config)
        gradients = {i: [jax.tree_util.tree_map(np.ones_like, m.theta)] for i, m in enumerate(members)}
        for _ in range(5):
            apply_outer_steps(members, gradients, lopt, OuterSettings(1.0, 0.01, limit))
        counts[limit] = {int(m.outer_state.step) for m in members}
        assert {m.steps for m in members} == {5}  # every step was taken either way
    assert counts == {3: {3}, 0: {5}}
    clamped = dataclasses.replace(smoke_config, tasks=dataclasses.replace(smoke_config.tasks, horizon_max=77))
    assert outer_time_limit(clamped) == 77
    free = dataclasses.replace(clamped, population=dataclasses.replace(clamped.population, clamp_outer_time=False))
    assert outer_time_limit(free) == 0
