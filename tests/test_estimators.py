"""ES and PES estimates point where jax.grad of the same unroll points."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfloop.config import EstimatorConfig, LOptConfig
from selfloop.estimators import (
    SlotState,
    _unit_length,
    as_inner_optimizer,
    clip_outliers,
    estimate_gradient,
    needs_reset,
    new_slot,
    standardized,
)
from selfloop.lopt import make_lopt
from selfloop.tasks import TASK_FAMILIES
from selfloop.tasks.base import TaskSpec
from selfloop.unroll import _data_key, task_program

# A smooth, deterministic problem: a noise-free 10-d quadratic.
SPEC = TaskSpec("quadratic", 0, seed=7, dynamic=(("log10_cond", 1.0), ("noise", 0.0), ("scale", 1.0)))
HORIZON = (1e6, 2e6)  # no reset during the test
LOPT_CONFIG = LOptConfig(hidden=8)  # ~250 lopt weights keep the ES variance small


def _reference_meta_loss(lopt, theta, segment: int, truncation: int):
    """Mean clipped ℓ/ℓ_0 over steps [segment*K, (segment+1)*K) of an unroll
    from the episode start, θ used at every step: the quantity ES/PES estimate."""
    program = task_program(SPEC.family, SPEC.bucket, as_inner_optimizer(lopt))
    family, bucket = TASK_FAMILIES[SPEC.family], program.bucket
    episode, inner = program.start(SPEC, 0, HORIZON)
    dyn = SPEC.dynamic_arrays()

    def step(carry, t):
        params, opt_state = carry
        key = _data_key(jnp.int32(SPEC.seed), jnp.int32(0), t)
        loss, grads = jax.value_and_grad(lambda p: family.loss(bucket, dyn, {}, episode.consts, p, key))(params)
        params, opt_state = lopt.update(theta, params, grads, opt_state)
        return (params, opt_state), loss

    _, losses = jax.lax.scan(step, (inner.params, inner.opt_state), jnp.arange((segment + 1) * truncation))
    ratios = jnp.clip(losses / episode.init_loss, 0.0, 1.5)
    return jnp.mean(ratios[segment * truncation :])


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def _cosine(a, b):
    a, b = _flat(a), _flat(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("kind,pairs,segments", [("es", 2048, 1), ("pes", 4096, 2)])
def test_estimate_agrees_with_jax_grad(kind, pairs, segments):
    lopt = make_lopt(LOPT_CONFIG)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    config = EstimatorConfig(kind=kind, pairs=pairs, std=0.01, chunk=10)
    truncation = 20
    slot = new_slot(lopt, SPEC, theta, config, HORIZON)
    for segment in range(segments):
        estimate = estimate_gradient(
            lopt, theta, SPEC, slot, truncation, config, HORIZON, jax.random.PRNGKey(10 + segment)
        )
        slot = estimate.slot
    exact = jax.grad(lambda t: _reference_meta_loss(lopt, t, segments - 1, truncation))(theta)
    assert _cosine(estimate.gradient, exact) > 0.9


def test_backpropagated_gradient_is_jax_grad_across_chunks():
    """kind "grad" over a truncation of two chunks is the gradient of the
    segment's meta-loss: the state's cotangent crosses the chunk boundary."""
    lopt = make_lopt(LOPT_CONFIG)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    config = EstimatorConfig(kind="grad", chunk=10)
    slot = new_slot(lopt, SPEC, theta, config, HORIZON)
    estimate = estimate_gradient(lopt, theta, SPEC, slot, 20, config, HORIZON, jax.random.PRNGKey(10))
    exact = jax.grad(lambda t: _reference_meta_loss(lopt, t, 0, 20))(theta)
    np.testing.assert_allclose(estimate.meta_loss, float(_reference_meta_loss(lopt, theta, 0, 20)), rtol=1e-5)
    assert _cosine(estimate.gradient, exact) > 0.999
    np.testing.assert_allclose(np.linalg.norm(_flat(estimate.gradient)), 1.0, rtol=1e-5)  # one size per task
    one_chunk = estimate_gradient(lopt, theta, SPEC, slot, 20, dataclasses.replace(config, chunk=20), HORIZON,
                                  jax.random.PRNGKey(10))
    assert _cosine(one_chunk.gradient, estimate.gradient) > 0.9999
    weighted = estimate_gradient(lopt, theta, SPEC, slot, 20, dataclasses.replace(config, grad_weight="meta_loss"),
                                 HORIZON, jax.random.PRNGKey(10))
    assert _cosine(weighted.gradient, estimate.gradient) > 0.9999  # the same direction, ...
    # ... at its segment's meta-loss's length
    np.testing.assert_allclose(np.linalg.norm(_flat(weighted.gradient)), estimate.meta_loss, rtol=1e-5)
    raw = estimate_gradient(lopt, theta, SPEC, slot, 20, dataclasses.replace(config, grad_weight="none"), HORIZON,
                            jax.random.PRNGKey(10))
    np.testing.assert_allclose(_flat(raw.gradient), _flat(exact), rtol=1e-3, atol=1e-6 * np.abs(_flat(exact)).max())


def test_pes_needs_its_accumulator():
    """Same PES segment without the accumulator (i.e. truncated ES from PES
    states) agrees less with the full gradient: the accumulator carries the
    influence of earlier segments."""
    lopt = make_lopt(LOPT_CONFIG)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    config = EstimatorConfig(kind="pes", pairs=4096, std=0.01, chunk=10)
    slot = new_slot(lopt, SPEC, theta, config, HORIZON)
    first = estimate_gradient(lopt, theta, SPEC, slot, 20, config, HORIZON, jax.random.PRNGKey(10))
    accumulator = first.slot.accumulator
    np.testing.assert_allclose(_flat(accumulator), _flat(first.slot.accumulator))
    assert np.linalg.norm(_flat(accumulator)) > 0
    exact = jax.grad(lambda t: _reference_meta_loss(lopt, t, 1, 20))(theta)
    with_acc = estimate_gradient(lopt, theta, SPEC, first.slot, 20, config, HORIZON, jax.random.PRNGKey(11))
    zeroed = first.slot._replace(accumulator=jax.tree_util.tree_map(jnp.zeros_like, accumulator))
    without = estimate_gradient(lopt, theta, SPEC, zeroed, 20, config, HORIZON, jax.random.PRNGKey(11))
    assert _cosine(with_acc.gradient, exact) > _cosine(without.gradient, exact)


def test_pes_accumulator_resets_with_the_episode():
    lopt = make_lopt(LOPT_CONFIG)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    config = EstimatorConfig(kind="pes", pairs=3, chunk=10)
    slot = new_slot(lopt, SPEC, theta, config, HORIZON)
    assert not np.any(_flat(slot.accumulator))
    estimate = estimate_gradient(lopt, theta, SPEC, slot, 10, config, HORIZON, jax.random.PRNGKey(1))
    # After one segment, A equals exactly the perturbations used.
    eps_norm = np.linalg.norm(_flat(estimate.slot.accumulator))
    assert eps_norm > 0
    restarted = new_slot(lopt, SPEC, theta, config, HORIZON, episode=1)
    assert not np.any(_flat(restarted.accumulator))
    assert int(restarted.episode.index) == 1 and int(restarted.episode.step) == 0


def test_episode_ends_after_horizon_and_on_non_finite_weights():
    lopt = make_lopt(LOPT_CONFIG)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    config = EstimatorConfig(kind="es", pairs=2, chunk=10)
    slot = new_slot(lopt, SPEC, theta, config, (15.0, 15.0), episode=1)  # episode 1: no stagger
    assert int(slot.episode.horizon) == 15 and not needs_reset(slot)
    slot = estimate_gradient(lopt, theta, SPEC, slot, 10, config, (15.0, 15.0), jax.random.PRNGKey(0)).slot
    assert not needs_reset(slot)
    slot = estimate_gradient(lopt, theta, SPEC, slot, 10, config, (15.0, 15.0), jax.random.PRNGKey(1)).slot
    assert needs_reset(slot)
    fresh = new_slot(lopt, SPEC, theta, config, HORIZON, episode=1)
    poisoned = fresh._replace(
        inners=fresh.inners._replace(params=jax.tree_util.tree_map(lambda x: x.at[0].set(jnp.nan), fresh.inners.params))
    )
    assert needs_reset(poisoned)


@pytest.mark.parametrize("kind", ["es", "grad"])
def test_non_finite_inner_loss_gives_finite_gradient(kind):
    """A diverging inner problem: losses become the clip value, not NaN."""
    lopt = make_lopt(LOPT_CONFIG)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    theta = jax.tree_util.tree_map(lambda x: x * 1e3, theta)  # wildly large steps
    spec = dataclasses.replace(SPEC, dynamic=(("log10_cond", 4.0), ("noise", 0.0), ("scale", 1e3)))
    config = EstimatorConfig(kind=kind, pairs=4, chunk=10)
    slot = new_slot(lopt, spec, theta, config, HORIZON)
    estimate = estimate_gradient(lopt, theta, spec, slot, 50, config, HORIZON, jax.random.PRNGKey(0))
    assert np.all(np.isfinite(_flat(estimate.gradient)))
    assert np.isfinite(estimate.meta_loss)


@pytest.mark.parametrize("kind", ["es", "grad"])
def test_same_key_same_estimate(kind):
    """Units are replayable: the same inputs give bit-identical results, and a
    retried unit can start again from the slot it was given (not donated)."""
    lopt = make_lopt(LOPT_CONFIG)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    config = EstimatorConfig(kind=kind, pairs=4, chunk=10)
    results = []
    for _ in range(2):
        slot = new_slot(lopt, SPEC, theta, config, HORIZON)
        results.append(estimate_gradient(lopt, theta, SPEC, slot, 20, config, HORIZON, jax.random.PRNGKey(3)))
    retried = estimate_gradient(lopt, theta, SPEC, slot, 20, config, HORIZON, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(_flat(results[0].gradient), _flat(results[1].gradient))
    np.testing.assert_array_equal(_flat(retried.gradient), _flat(results[1].gradient))
    assert isinstance(results[0].slot, SlotState)


def test_standardized_estimate_keeps_the_direction_and_has_one_size():
    """``estimator.standardize`` rescales a task's estimate, never turns it:
    the same unroll gives the plain estimate times a positive number, and
    differences of any size become differences of RMS 1. (It acts on the
    differences before ES and PES part ways, so ES covers both.)"""
    lopt = make_lopt(LOPT_CONFIG)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    estimates = []
    for standardize in (False, True):
        config = EstimatorConfig(kind="es", pairs=8, chunk=10, standardize=standardize)
        slot = new_slot(lopt, SPEC, theta, config, HORIZON)
        estimates.append(estimate_gradient(lopt, theta, SPEC, slot, 20, config, HORIZON, jax.random.PRNGKey(5)))
    plain, scaled = (_flat(e.gradient) for e in estimates)
    assert _cosine(estimates[0].gradient, estimates[1].gradient) > 0.9999
    assert np.linalg.norm(plain) > 0 and not np.allclose(plain, scaled)
    assert estimates[0].meta_loss == estimates[1].meta_loss  # the same unroll

    differences = np.array([0.3, -0.1, 0.0, 0.2])
    for size in (1e-6, 1.0, 1e3):
        unit = standardized(size * differences)
        np.testing.assert_allclose(np.sqrt(np.mean(unit**2)), 1.0, rtol=1e-6)
        np.testing.assert_allclose(unit, standardized(differences), rtol=1e-6)
    np.testing.assert_array_equal(standardized(np.zeros(4)), np.zeros(4))  # a tie carries no direction


def test_unit_length_keeps_the_direction_of_gradients_beyond_float32_squares():
    rng = np.random.default_rng(0)
    tree = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=5), jnp.float32)}
    unit = _flat(_unit_length(tree))
    np.testing.assert_allclose(np.linalg.norm(unit), 1.0, rtol=1e-5)
    np.testing.assert_allclose(unit, _flat(tree) / np.linalg.norm(_flat(tree)), rtol=1e-5, atol=1e-7)
    huge = _unit_length(jax.tree_util.tree_map(lambda x: x * 1e30, tree))  # squares overflow float32
    np.testing.assert_allclose(_flat(huge), unit, rtol=1e-5, atol=1e-7)
    assert not np.any(_flat(_unit_length(jax.tree_util.tree_map(jnp.zeros_like, tree))))  # zeros stay zeros


def test_outlier_clip_shortens_only_estimates_beyond_the_factor_and_keeps_their_direction():
    """``estimator.outlier_clip``: an estimate longer than factor x the round's
    median length is cut to that length along its own direction; the rest,
    and every estimate with the clip off, pass unchanged."""
    rng = np.random.default_rng(0)

    def estimate(length):
        tree = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
        return {k: (v * (length / np.linalg.norm(_flat(tree)))).astype(np.float32) for k, v in tree.items()}

    # Lengths 1, 2, 3 | 4, 40: median 3, so a factor of 2 allows 6 and cuts only the 40.
    estimates = {0: [estimate(1.0), estimate(2.0)], 1: [estimate(3.0)], 3: [estimate(4.0), estimate(40.0)]}
    clipped, shortened = clip_outliers(estimates, 2.0)
    assert shortened == 1 and set(clipped) == {0, 1, 3}
    for key, group in estimates.items():
        for before, after in zip(group, clipped[key]):
            if before is estimates[3][1]:
                assert np.isclose(np.linalg.norm(_flat(after)), 6.0, rtol=1e-5)
                assert _cosine(before, after) > 0.99999
                assert after["w"].dtype == np.float32
            else:
                for leaf in before:
                    np.testing.assert_array_equal(before[leaf], after[leaf])
    assert clip_outliers(estimates, 0.0) == (estimates, 0)
    assert clip_outliers({}, 2.0) == ({}, 0)
    # A round of zero estimates (every pair tied) has nothing to cut.
    zeros = {0: [jax.tree_util.tree_map(np.zeros_like, estimate(1.0))] * 2}
    assert clip_outliers(zeros, 2.0)[1] == 0
