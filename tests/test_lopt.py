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

PER_TENSOR = LOptConfig(features="per_tensor", odd=False)  # the original lopt (shipped default.h5)


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
    state = make_lopt(PER_TENSOR).init_state(params)
    new_params, new_state = update(config, theta, params, grads, state)
    np.testing.assert_allclose(new_params["w"], params["w"] - 1e-3 * d * np.exp(1e-3 * m), rtol=1e-6)
    expected_momenta = (1.0 - np.array(DECAYS))[None, :] * np.asarray(grads["w"])[:, None]
    # float32 rounds 1 - 0.9999 to 1e-4 within 2e-4 relative
    np.testing.assert_allclose(new_state.momenta["w"], expected_momenta, rtol=1e-3)
    assert int(new_state.step) == 1


@pytest.mark.parametrize("shape", [(), (3,), (4, 5), (2, 3, 4), (2, 2, 3, 3)])
def test_shapes_and_state_for_ranks_0_to_4(shape):
    lopt = make_lopt(PER_TENSOR)
    theta = lopt.init_theta(jax.random.PRNGKey(1))
    params = {"t": jnp.ones(shape)}
    state = lopt.init_state(params)
    assert state.momenta["t"].shape == shape + (len(DECAYS),)
    new_params, new_state = lopt.update(theta, params, {"t": jnp.full(shape, 0.5)}, state)
    assert new_params["t"].shape == shape
    assert new_state.momenta["t"].shape == state.momenta["t"].shape


@pytest.mark.parametrize("magnitude", [0.0, 1e-30, 1e30, np.inf, np.nan])
def test_update_finite_for_extreme_gradients(magnitude):
    lopt = make_lopt(PER_TENSOR)
    theta = lopt.init_theta(jax.random.PRNGKey(2))
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    grads = {"w": jnp.full((3, 4), magnitude, jnp.float32)}
    new_params, _ = lopt.update(theta, params, grads, lopt.init_state(params))
    assert np.all(np.isfinite(new_params["w"]))


def test_second_update_does_not_recompile():
    lopt = make_lopt(PER_TENSOR)
    step = jax.jit(lopt.update)
    theta = lopt.init_theta(jax.random.PRNGKey(3))
    params = {"w": jnp.ones((4, 4))}
    state = lopt.init_state(params)
    params, state = step(theta, params, params, state)
    params, state = step(theta, params, params, state)
    assert step._cache_size() == 1


def test_same_update_trains_a_task_and_another_lopt():
    """An outer optimizer is the same code path: θ_j is just another pytree."""
    lopt = make_lopt(PER_TENSOR)
    outer = lopt.init_theta(jax.random.PRNGKey(4))
    inner_theta = lopt.init_theta(jax.random.PRNGKey(5))
    grads = jax.tree_util.tree_map(jnp.ones_like, inner_theta)
    update = jax.jit(lopt.update)  # compiled, as the master runs it
    new_theta, state = update(outer, inner_theta, grads, lopt.init_state(inner_theta))
    assert jax.tree_util.tree_structure(new_theta) == jax.tree_util.tree_structure(inner_theta)
    assert any(
        not np.allclose(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(new_theta), jax.tree_util.tree_leaves(inner_theta))
    )


RELATIVE_ODD = LOptConfig(features="relative", odd=True)
ADAPTIVE_ODD = LOptConfig(features="adaptive", odd=True)
SCALED_ODD = LOptConfig(features="scaled", odd=True)


def _step(config: LOptConfig, grads, params, state=None, key=6):
    lopt = make_lopt(config)
    theta = lopt.init_theta(jax.random.PRNGKey(key))
    state = lopt.init_state(params) if state is None else state
    new_params, new_state = lopt.update(theta, params, grads, state)
    return jax.tree_util.tree_map(jnp.subtract, params, new_params), new_state


def test_relative_channels_exact_after_one_step():
    """After one gradient the running scale is that gradient's RMS (bias-corrected)."""
    from selfloop.lopt.mlp import GRAD_SCALE_DECAY, relative_channels, tensor_rms

    g = jnp.array([[0.3, -1.2], [2.0, 0.1]])
    rms = float(np.sqrt(np.mean(np.square(np.asarray(g)))))
    np.testing.assert_allclose(tensor_rms(g), rms, rtol=1e-6)
    np.testing.assert_allclose(tensor_rms(g * 1e-30), rms * 1e-30, rtol=1e-5)
    np.testing.assert_allclose(tensor_rms(g * 1e30), rms * 1e30, rtol=1e-5)
    momentum = (1.0 - jnp.asarray(DECAYS)) * g[..., None]
    _, state = _step(RELATIVE_ODD, {"w": g}, {"w": jnp.ones((2, 2))})
    unbiased = state.grad_scale["w"] / state.scale_weight
    np.testing.assert_allclose(unbiased, rms, rtol=1e-5)
    np.testing.assert_allclose(state.scale_weight, 1.0 - GRAD_SCALE_DECAY, rtol=1e-5)
    expected = np.concatenate([np.asarray(g)[..., None], np.asarray(momentum)], axis=-1) / rms
    np.testing.assert_allclose(relative_channels(g, momentum, unbiased), expected, rtol=1e-4)


@pytest.mark.parametrize("features", ["relative", "adaptive", "scaled"])
def test_odd_lopt_takes_no_step_without_gradient(features):
    params = {"w": jnp.linspace(-2.0, 2.0, 12).reshape(3, 4), "b": jnp.ones(4)}
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    step, state = _step(LOptConfig(features=features, odd=True), zeros, params)
    assert all(np.all(np.asarray(x) == 0.0) for x in jax.tree_util.tree_leaves(step))
    assert int(state.step) == 1
    # Without the symmetry the same weights do move: the MLP's biases and the weight channel.
    step, _ = _step(LOptConfig(features=features, odd=False), zeros, params)
    assert any(np.any(np.asarray(x) != 0.0) for x in jax.tree_util.tree_leaves(step))


@pytest.mark.parametrize("config", [RELATIVE_ODD, ADAPTIVE_ODD, SCALED_ODD])
def test_odd_lopt_step_flips_with_the_gradient(config):
    params = {"w": jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)}
    grads = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)}
    step, _ = _step(config, grads, params)
    flipped, _ = _step(config, jax.tree_util.tree_map(jnp.negative, grads), params)
    # Steps are read back as differences of weights up to 2 in size: float32 resolves them to ~2.4e-7.
    np.testing.assert_allclose(flipped["w"], -step["w"], rtol=1e-5, atol=5e-7)
    assert np.any(np.asarray(step["w"]) != 0.0)


@pytest.mark.parametrize("config", [RELATIVE_ODD, ADAPTIVE_ODD])
def test_relative_features_are_scale_free(config):
    params = {"w": jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)}
    grads = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    reference, _ = _step(config, {"w": jnp.asarray(grads)}, params)
    for scale in (1e-25, 1e-3, 1e20):
        scaled, _ = _step(config, {"w": jnp.asarray(grads * np.float32(scale))}, params)
        np.testing.assert_allclose(scaled["w"], reference["w"], rtol=1e-4, atol=1e-8)


def test_relative_momentum_of_noise_is_small_and_of_a_vanished_gradient_fades():
    """What per-tensor normalization hides: relative to the running scale, the
    slow momentum of pure noise stays far below 1, and after the gradient stops
    the momentum channels stay small instead of being blown back up to unit size."""
    from selfloop.lopt.mlp import relative_channels

    lopt = make_lopt(RELATIVE_ODD)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    params = {"w": jnp.zeros((64, 64))}
    state = lopt.init_state(params)
    update = jax.jit(lopt.update)
    rng = np.random.default_rng(2)
    for _ in range(300):
        params, state = update(theta, params, {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)}, state)

    def channel_rms(state):
        scale = state.grad_scale["w"] / state.scale_weight
        channels = relative_channels(jnp.zeros((64, 64)), state.momenta["w"], scale)
        return np.sqrt(np.mean(np.square(np.asarray(channels)), axis=(0, 1)))

    noise = channel_rms(state)
    assert noise[DECAYS.index(0.99) + 1] < 0.15 and noise[DECAYS.index(0.999) + 1] < 0.1
    zero = {"w": jnp.zeros((64, 64))}
    for _ in range(200):
        params, state = update(theta, params, zero, state)
    after = channel_rms(state)
    assert after[0] == 0.0 and np.all(after[1:] < 0.1)
    per_tensor = normalize_per_tensor(state.momenta["w"]).std(axis=(0, 1))  # what "per_tensor" would feed
    assert per_tensor[DECAYS.index(0.99)] > 0.9 and per_tensor[DECAYS.index(0.999)] > 0.9


@pytest.mark.parametrize("config", [RELATIVE_ODD, ADAPTIVE_ODD])
@pytest.mark.parametrize("magnitude", [0.0, 1e-30, 1e30, np.inf, np.nan])
def test_relative_update_finite_for_extreme_gradients(config, magnitude):
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    step, state = _step(config, {"w": jnp.full((3, 4), magnitude, jnp.float32)}, params)
    assert np.all(np.isfinite(step["w"])) and all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state))


def test_adaptive_channels_exact_after_one_step():
    """After one gradient each weight's RMS is its own |g|: the per-weight g channel
    is sign(g) and each picked momentum channel (1 - β)·sign(g)."""
    from selfloop.lopt.mlp import ADAPTIVE_DECAYS, adaptive_channels, relative_channels

    g = jnp.array([[0.3, -1.2], [2.0, 0.0]])
    _, state = _step(ADAPTIVE_ODD, {"w": g}, {"w": jnp.ones((2, 2))})
    unbiased_scale = state.grad_scale["w"] / state.scale_weight
    relative = relative_channels(g, state.momenta["w"], unbiased_scale)
    np.testing.assert_allclose(state.second_moment["w"] / state.scale_weight, np.square(relative[..., 0]), rtol=1e-4)
    channels = np.asarray(adaptive_channels(relative, state.second_moment["w"] / state.scale_weight))
    signs = np.sign(np.asarray(g))[..., None]
    expected = signs * np.array([1.0] + [1.0 - b for b in ADAPTIVE_DECAYS])
    np.testing.assert_allclose(channels, expected, rtol=1e-4, atol=1e-7)  # the weight with g = 0 gets zeros


def test_adaptive_channels_size_each_weight_by_its_own_gradient():
    """Two weights of one tensor whose gradients differ 100-fold in size: relative
    channels keep the factor of 100 (one scale per tensor); the per-weight
    channels give both the same size, as Adam's steps would."""
    from selfloop.lopt.mlp import adaptive_channels, relative_channels

    lopt = make_lopt(ADAPTIVE_ODD)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    params = {"w": jnp.zeros((2, 256))}
    state = lopt.init_state(params)
    update = jax.jit(lopt.update)
    rng = np.random.default_rng(3)
    sizes = np.array([[1.0], [100.0]], np.float32)
    for _ in range(200):
        grads = {"w": jnp.asarray(sizes * (0.5 + rng.normal(size=(2, 256))), jnp.float32)}
        params, state = update(theta, params, grads, state)
    unbiased_scale = state.grad_scale["w"] / state.scale_weight
    relative = relative_channels(grads["w"], state.momenta["w"], unbiased_scale)
    per_weight = adaptive_channels(relative, state.second_moment["w"] / state.scale_weight)

    def rms_by_row(x):
        return np.sqrt(np.mean(np.square(np.asarray(x)), axis=1))

    small, large = rms_by_row(relative[..., 0])
    assert 70.0 < large / small < 140.0
    small, large = rms_by_row(per_weight[..., 0])
    assert 0.7 < large / small < 1.4 and 0.5 < small < 2.0


def test_scaled_channels_tell_the_mlp_how_large_weights_and_gradients_are():
    """Scaled features read log10 sizes of the tensor's weights and running
    gradient RMS; with them a task whose weights (or gradients) are 100 times
    larger gets a different step, where every adaptive channel is blind to it."""
    from selfloop.lopt.mlp import SCALE_DIVISOR, scale_channels

    params = {"w": jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)}
    grads = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)}
    _, state = _step(SCALED_ODD, grads, params)
    p_rms = float(np.sqrt(np.mean(np.square(np.asarray(params["w"])))))
    g_rms = float(np.sqrt(np.mean(np.square(np.asarray(grads["w"])))))
    np.testing.assert_allclose(scale_channels(params["w"], state.grad_scale["w"] / state.scale_weight),
                               np.log10([p_rms, g_rms]) / SCALE_DIVISOR, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(scale_channels(jnp.zeros(4), jnp.float32(0.0)))))
    assert make_lopt(SCALED_ODD).init_theta(jax.random.PRNGKey(0))["layer0"]["w"].shape[0] == 25

    def step_ratio(config, scale_params, scale_grads):
        reference, _ = _step(config, grads, params)
        scaled, _ = _step(config, jax.tree_util.tree_map(lambda g: g * scale_grads, grads),
                          jax.tree_util.tree_map(lambda p: p * scale_params, params))
        return np.asarray(scaled["w"]) / np.asarray(reference["w"])

    # Steps are read back as differences of weights: 100-fold weights resolve them to ~3 %.
    for sizes in ((100.0, 1.0), (1.0, 100.0)):
        np.testing.assert_allclose(step_ratio(ADAPTIVE_ODD, *sizes), 1.0, rtol=0.05)
        assert np.max(np.abs(step_ratio(SCALED_ODD, *sizes) - 1.0)) > 0.2


def test_outer_step_multiplier_scales_the_step_before_the_rail_and_the_step_scale_after():
    from selfloop.lopt.base import tree_l2_norm
    from selfloop.master.population import OuterSettings, outer_step_fn

    lopt = make_lopt(RELATIVE_ODD)
    outer, theta = lopt.init_theta(jax.random.PRNGKey(7)), lopt.init_theta(jax.random.PRNGKey(8))
    gradient = jax.tree_util.tree_map(lambda x: jnp.ones_like(x), theta)
    step = outer_step_fn(lopt)

    def moved(scale, rail, mult=1.0):
        out = step(outer, theta, gradient, lopt.init_state(theta), jnp.float32(0.5), jnp.float32(scale),
                   OuterSettings(jnp.float32(mult), jnp.float32(rail), jnp.int32(0)))
        return float(tree_l2_norm(jax.tree_util.tree_map(jnp.subtract, out.theta, theta))), out

    free, out = moved(1.0, 0.0)
    assert not out.shortened and np.isclose(moved(0.25, 0.0)[0], 0.25 * free, rtol=1e-4)
    rail = 0.5 * float(out.step_ratio)  # binds: the scale then shortens the railed step
    railed, out = moved(1.0, rail)
    assert out.shortened and np.isclose(moved(0.25, rail)[0], 0.25 * railed, rtol=1e-4)
    assert np.isclose(railed, rail * float(tree_l2_norm(theta)), rtol=1e-4)
    # The multiplier shortens the proposal, which then fits within that rail.
    short, out = moved(1.0, rail, mult=0.4)
    assert not out.shortened and np.isclose(short, 0.4 * free, rtol=1e-4)
    assert np.isclose(float(out.step_ratio), 0.4 * 2 * rail, rtol=1e-4)


@pytest.mark.parametrize("config", [RELATIVE_ODD, ADAPTIVE_ODD, SCALED_ODD])
def test_odd_outer_optimizer_does_not_move_theta_without_signal(config):
    """The drift check on the self-training path itself: 200 outer steps fed ĝ = 0."""
    from selfloop.master.population import OuterSettings, outer_step_fn

    lopt = make_lopt(config)
    outer, theta = lopt.init_theta(jax.random.PRNGKey(7)), lopt.init_theta(jax.random.PRNGKey(8))
    state, start = lopt.init_state(theta), theta
    zeros = jax.tree_util.tree_map(jnp.zeros_like, theta)
    step = outer_step_fn(lopt)
    for _ in range(200):
        out = step(outer, theta, zeros, state, jnp.float32(0.5), jnp.float32(1.0),
                   OuterSettings(jnp.float32(1.0), jnp.float32(0.003), jnp.int32(2000)))
        theta, state = out.theta, out.state
    for a, b in zip(jax.tree_util.tree_leaves(theta), jax.tree_util.tree_leaves(start)):
        np.testing.assert_array_equal(a, b)
