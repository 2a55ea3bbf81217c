"""The hierarchical lopt (per-tensor LSTM + per-parameter MLP): shapes, stability, both roles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfloop.config import LOptConfig
from selfloop.estimators import as_inner_optimizer
from selfloop.lopt import make_lopt
from selfloop.lopt.hierarchical import DECAYS, LSTM_INPUTS, MLP_INPUTS, POOLED, RMS_DECAYS
from selfloop.tasks.base import TaskSpec
from selfloop.unroll import learning_curves

CONFIG = LOptConfig(arch="hierarchical", features="per_tensor", odd=False)


def _lopt():
    return make_lopt(CONFIG)


def test_weight_count_and_random_init():
    lopt = _lopt()
    a, b = lopt.init_theta(jax.random.PRNGKey(0)), lopt.init_theta(jax.random.PRNGKey(1))
    count = sum(x.size for x in jax.tree_util.tree_leaves(a))
    lstm = LSTM_INPUTS * 256 + 64 * 256 + 256
    assert count == lstm + (64 * 17 + 17) + (MLP_INPUTS * 32 + 32) + (32 * 32 + 32) + (32 * (2 + POOLED) + 2 + POOLED)
    assert not np.allclose(a["lstm"]["wx"], b["lstm"]["wx"])  # random, not a pretrained start


@pytest.mark.parametrize("shape", [(), (3,), (4, 5), (2, 3, 4), (2, 2, 3, 3)])
def test_shapes_and_state_for_ranks_0_to_4(shape):
    lopt = _lopt()
    theta = lopt.init_theta(jax.random.PRNGKey(1))
    params = {"t": jnp.ones(shape), "bias": jnp.zeros((2,))}
    state = lopt.init_state(params)
    assert state.tensors["t"].momenta.shape == shape + (len(DECAYS),)
    assert state.tensors["t"].second_moments.shape == shape + (len(RMS_DECAYS),)
    assert state.tensors["t"].lstm_h.shape == (64,) and state.tensors["t"].pooled.shape == (POOLED,)
    grads = {"t": jnp.full(shape, 0.5), "bias": jnp.ones((2,))}
    new_params, new_state = jax.jit(lopt.update)(theta, params, grads, state, jnp.float32(2.0))
    assert new_params["t"].shape == shape and int(new_state.step) == 1
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert not np.allclose(new_state.tensors["t"].lstm_h, 0.0)  # the LSTM ran
    assert np.all(np.isfinite(new_params["t"]))


@pytest.mark.parametrize("magnitude", [0.0, 1e-30, 1e30, np.inf, np.nan])
def test_update_finite_for_extreme_gradients(magnitude):
    lopt = _lopt()
    theta = lopt.init_theta(jax.random.PRNGKey(2))
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    state = lopt.init_state(params)
    update = jax.jit(lopt.update)
    for loss in (jnp.float32(1.0), jnp.float32(magnitude)):  # two steps: the clip EMA and loss features engage
        params, state = update(theta, params, {"w": jnp.full((3, 4), magnitude, jnp.float32)}, state, loss)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves((params, state)))


def test_dynamic_clipping_bounds_a_gradient_spike():
    lopt = _lopt()
    theta = lopt.init_theta(jax.random.PRNGKey(3))
    params = {"w": jnp.zeros((8,))}
    state = lopt.init_state(params)
    update = jax.jit(lopt.update)
    _, state = update(theta, params, {"w": jnp.ones((8,))}, state)
    _, spiked = update(theta, params, {"w": jnp.full((8,), 1e6)}, state)
    # The momentum saw the spike clipped to 10x the running rms(g) of 1.
    assert float(jnp.max(spiked.tensors["w"].momenta[..., 0])) <= 0.1 * 1.0 + 0.9 * 10.0 + 1e-4


def test_it_trains_a_task_and_another_lopts_weights_through_the_same_code_path():
    lopt = _lopt()
    theta = lopt.init_theta(jax.random.PRNGKey(4))
    # Role 1: the inner optimizer of a task, through the compiled unroll.
    spec = TaskSpec("quadratic", 0, 7, (("log10_cond", 1.0), ("noise", 0.0), ("scale", 1.0)))
    stacked = jax.tree_util.tree_map(lambda x: x[None], theta)
    curve = learning_curves(spec, as_inner_optimizer(lopt), stacked, num_steps=20, chunk=10)
    assert curve.shape == (21, 1) and np.all(np.isfinite(curve))
    # Role 2: the outer optimizer of another member: its θ is just another pytree.
    other = lopt.init_theta(jax.random.PRNGKey(5))
    grads = jax.tree_util.tree_map(jnp.ones_like, other)
    # Compiled, as the master compiles it: op by op, each of its ops would compile once per tensor shape.
    new_other, state = jax.jit(lopt.update)(theta, other, grads, lopt.init_state(other), jnp.float32(0.8))
    assert jax.tree_util.tree_structure(new_other) == jax.tree_util.tree_structure(other)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(new_other),
                                                     jax.tree_util.tree_leaves(other)))  # fmt: skip
