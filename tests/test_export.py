"""A self-trained optimizer leaves the package as a plain optax optimizer."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import selfloop
from selfloop.config import ConfigError
from selfloop.export import choose_member, export_member
from selfloop.master.pbt import crown
from selfloop.master.trainer import Trainer
from selfloop.store.optimizer import PRETRAINED, load_theta


def _train_linear_regression(optimizer: optax.GradientTransformation, steps: int = 300) -> tuple[float, float]:
    """A standard optax loop on a small least-squares problem; (first loss, last loss)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    inputs = jax.random.normal(keys[0], (128, 16))
    targets = inputs @ jax.random.normal(keys[1], (16, 1)) + 0.01 * jax.random.normal(keys[2], (128, 1))
    params = {"w": jnp.zeros((16, 1)), "b": jnp.zeros((1,))}

    def loss_fn(p):
        return jnp.mean((inputs @ p["w"] + p["b"] - targets) ** 2)

    @jax.jit
    def step(p, state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state = optimizer.init(params)
    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return losses[0], float(loss_fn(params))


@pytest.mark.skipif(not (PRETRAINED / "default.h5").exists(), reason="no shipped optimizer in this checkout")
def test_the_shipped_optimizer_trains_a_model_in_a_plain_optax_loop():
    first, last = _train_linear_regression(selfloop.load_optimizer())
    assert np.isfinite(last) and last < 0.1 * first


@pytest.mark.skipif(not (PRETRAINED / "default.h5").exists(), reason="no shipped optimizer in this checkout")
def test_loading_an_optimizer_imports_nothing_of_the_self_training_loop():
    # A user who only trains a model with a shipped optimizer needs the lopt
    # and the h5 tree store, not the population, PBT, estimators or the farm.
    code = (
        "import sys, selfloop; selfloop.load_optimizer(); "
        "print(' '.join(m for m in sys.modules if m.startswith('selfloop')))"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(imported.split())
    assert "selfloop.store.optimizer" in loaded and "selfloop.lopt" in loaded
    loop = {"master", "farm", "estimators", "unroll", "evaluation", "observe"}
    assert not {m for m in loaded if set(m.split(".")[1:2]) & loop or m == "selfloop.store.checkpoint"}


def test_export_round_trips_the_members_weights(smoke_config, tmp_path):
    trainer = Trainer(smoke_config, tmp_path, report=lambda r: None)
    state = trainer.new_state()
    trainer.run_round(state)
    state.members[2].history = [0.7, 0.4]
    state.members[1].history = [0.9, 0.5]
    assert choose_member(state, "best") == 2 and choose_member(state, "1") == 1
    with pytest.raises(ConfigError, match="--member"):
        choose_member(state, "9")
    with pytest.raises(ConfigError, match="no PBT champion"):
        export_member(state, smoke_config, "champion", tmp_path / "none.h5", source="test")
    state.champion = crown(state.members[3], 3, round_index=1)
    export_member(state, smoke_config, "champion", tmp_path / "champion.h5", source="test")
    _, champion_theta = load_theta(tmp_path / "champion.h5")
    for a, b in zip(jax.tree_util.tree_leaves(champion_theta), jax.tree_util.tree_leaves(state.members[3].theta)):
        np.testing.assert_array_equal(a, b)
    export_member(state, smoke_config, 2, tmp_path / "opt.h5", source="test")
    lopt_config, theta = load_theta(tmp_path / "opt.h5")
    assert lopt_config == smoke_config.lopt
    for a, b in zip(jax.tree_util.tree_leaves(theta), jax.tree_util.tree_leaves(state.members[2].theta)):
        np.testing.assert_array_equal(a, b)
    optimizer = selfloop.load_optimizer(tmp_path / "opt.h5")
    params = {"w": jnp.ones((3,))}
    updates, _ = optimizer.update({"w": jnp.ones((3,))}, optimizer.init(params), params)
    assert updates["w"].shape == (3,) and bool(jnp.all(jnp.isfinite(updates["w"])))
    with pytest.raises(ValueError, match="params"):
        optimizer.update({"w": jnp.ones((3,))}, optimizer.init(params))


def test_export_from_an_earlier_checkpoint_by_round(smoke_config, tmp_path):
    from selfloop.export import export_from_run
    from selfloop.store.checkpoint import write_checkpoint

    trainer = Trainer(smoke_config, tmp_path, report=lambda r: None)
    state = trainer.new_state()
    earlier = state.members[0].theta
    write_checkpoint(tmp_path, state, smoke_config)
    trainer.run_round(state)
    write_checkpoint(tmp_path, state, smoke_config)
    assert state.round == 1

    export_from_run(tmp_path, smoke_config, "0", tmp_path / "r0.h5", round_index=0)
    export_from_run(tmp_path, smoke_config, "0", tmp_path / "newest.h5")
    _, from_round_0 = load_theta(tmp_path / "r0.h5")
    _, newest = load_theta(tmp_path / "newest.h5")
    for a, b in zip(jax.tree_util.tree_leaves(from_round_0), jax.tree_util.tree_leaves(earlier)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(newest),
                                                         jax.tree_util.tree_leaves(earlier)))
    with pytest.raises(ConfigError, match=r"--round 7: .* keeps checkpoints of: \[0, 1\]"):
        export_from_run(tmp_path, smoke_config, "0", tmp_path / "r7.h5", round_index=7)
