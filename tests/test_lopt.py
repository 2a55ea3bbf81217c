"""The MLP learned optimizer: exact features, the step formula, shapes, stability."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfloop.config import LOptConfig
from selfloop.lopt import make_lopt
from selfloop.lopt.base import normalize_per_tensor
from selfloop.lopt.mlp import DECAYS, NUM_INPUTS, TIMESCALES, MLPLOptConfig, init_theta, time_features, update


def test_feature_normalization_matches_formula():
    x = np.array([[1.0, -2.0], [3.0, 0.5], [0.0, 4.0]], np.float32)  # 3 weights, 2 channels
    expected = x / np.sqrt(1e-5 + np.mean(x**2, axis=0, keepdims=True))
    np.testing.assert_allclose(normalize_per_tensor(jnp.asarray(x)), expected, rtol=1e-6)


def test_feature_normalization_is_scale_free_and_finite_at_extremes():
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    reference = np.asarray(normalize_per_tensor(jnp.asarray(x)))
    for scale in (1e-12, 1e12, 1e30):
        scaled = np.asarray(normalize_per_tensor(jnp.asarray(x * np.float32(scale))))
        assert np.all(np.isfinite(scaled))
        if scale >= 1.0:  # tiny inputs are (correctly) damped by the epsilon
            np.testing.assert_allclose(scaled, reference, rtol=1e-4, atol=1e-5)


def test_time_features_exact():
    np.testing.assert_allclose(time_features(jnp.int32(0)), np.tanh(-np.ones(11)), rtol=1e-6)
    expected = np.tanh(30.0 / np.array(TIMESCALES) - 1.0)
    np.testing.assert_allclose(time_features(jnp.int32(30)), expected, rtol=1e-5)


def test_input_count_and_weight_count():
    theta = init_theta(MLPLOptConfig(), jax.random.PRNGKey(0))
    assert theta["layer0"]["w"].shape == (NUM_INPUTS, 32) and NUM_INPUTS == 19
    assert sum(x.size for x in jax.tree_util.tree_leaves(theta)) == 19 * 32 + 32 + 32 * 32 + 32 + 32 * 2 + 2


def test_step_is_step_mult_d_exp_m():
    """With every weight zero but the output bias (d, m), the step is exact."""
    config = MLPLOptConfig()
    theta = jax.tree_util.tree_map(jnp.zeros_like, init_theta(config, jax.random.PRNGKey(0)))
    d, m = 0.7, -250.0
    theta["layer2"]["b"] = jnp.array([d, m])
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.1, 0.2, -0.3])}
    state = make_lopt(LOptConfig()).init_state(params)
    new_params, new_state = update(config, theta, params, grads, state)
    np.testing.assert_allclose(new_params["w"], params["w"] - 1e-3 * d * np.exp(1e-3 * m), rtol=1e-6)
    expected_momenta = (1.0 - np.array(DECAYS))[None, :] * np.asarray(grads["w"])[:, None]
    # float32 rounds 1 - 0.9999 to 1e-4 within 2e-4 relative
    np.testing.assert_allclose(new_state.momenta["w"], expected_momenta, rtol=1e-3)
    assert int(new_state.step) == 1


@pytest.mark.parametrize("shape", [(), (3,), (4, 5), (2, 3, 4), (2, 2, 3, 3)])
def test_shapes_and_state_for_ranks_0_to_4(shape):
    lopt = make_lopt(LOptConfig())
    theta = lopt.init_theta(jax.random.PRNGKey(1))
    params = {"t": jnp.ones(shape)}
    state = lopt.init_state(params)
    assert state.momenta["t"].shape == shape + (len(DECAYS),)
    new_params, new_state = lopt.update(theta, params, {"t": jnp.full(shape, 0.5)}, state)
    assert new_params["t"].shape == shape
    assert new_state.momenta["t"].shape == state.momenta["t"].shape


@pytest.mark.parametrize("magnitude", [0.0, 1e-30, 1e30, np.inf, np.nan])
def test_update_finite_for_extreme_gradients(magnitude):
    lopt = make_lopt(LOptConfig())
    theta = lopt.init_theta(jax.random.PRNGKey(2))
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    grads = {"w": jnp.full((3, 4), magnitude, jnp.float32)}
    new_params, _ = lopt.update(theta, params, grads, lopt.init_state(params))
    assert np.all(np.isfinite(new_params["w"]))


def test_second_update_does_not_recompile():
    lopt = make_lopt(LOptConfig())
    step = jax.jit(lopt.update)
    theta = lopt.init_theta(jax.random.PRNGKey(3))
    params = {"w": jnp.ones((4, 4))}
    state = lopt.init_state(params)
    params, state = step(theta, params, params, state)
    params, state = step(theta, params, params, state)
    assert step._cache_size() == 1


def test_same_update_trains_a_task_and_another_lopt():
    """An outer optimizer is the same code path: θ_j is just another pytree."""
    lopt = make_lopt(LOptConfig())
    outer = lopt.init_theta(jax.random.PRNGKey(4))
    inner_theta = lopt.init_theta(jax.random.PRNGKey(5))
    grads = jax.tree_util.tree_map(jnp.ones_like, inner_theta)
    new_theta, state = lopt.update(outer, inner_theta, grads, lopt.init_state(inner_theta))
    assert jax.tree_util.tree_structure(new_theta) == jax.tree_util.tree_structure(inner_theta)
    assert any(
        not np.allclose(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(new_theta), jax.tree_util.tree_leaves(inner_theta))
    )
