"""Task families, the sampler and normalization."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from selfloop.config import ALL_FAMILIES
from selfloop.evaluation import ADAM_LEARNING_RATES
from selfloop.evaluation.baselines import ADAM
from selfloop.tasks import TASK_FAMILIES, datasets
from selfloop.tasks.normalize import normalize_curve, ratio_to_initial
from selfloop.tasks.sampler import HELDOUT_SEEDS, TRAIN_SEEDS, heldout_tasks, sample_training_task
from selfloop.unroll import learning_curves

BUCKETS = [(name, b) for name, family in TASK_FAMILIES.items() for b in range(len(family.buckets))]


def test_registry_matches_config_choices():
    assert tuple(TASK_FAMILIES) == ALL_FAMILIES and len(ALL_FAMILIES) >= 8


def _spec_in(family, bucket, seed=0):
    rng = np.random.default_rng(seed)
    spec = sample_training_task(rng, (family,))
    return spec.__class__(family, bucket, spec.seed, spec.dynamic)


@pytest.mark.parametrize("family,bucket", BUCKETS)
def test_adam_trains_every_bucket(family, bucket):
    """Each problem is well posed: finite, non-negative, deterministic, learnable."""
    spec = _spec_in(family, bucket)
    rates = np.asarray([1e-3, 1e-2, 1e-1], np.float32)
    curves = learning_curves(spec, ADAM, rates, num_steps=60, chunk=20)
    again = learning_curves(spec, ADAM, rates, num_steps=60, chunk=20)
    np.testing.assert_array_equal(curves, again)
    assert np.all(np.isfinite(curves[0])) and np.all(curves[0] >= 0)
    assert np.all(curves[0] == curves[0, 0])  # one initialization for every optimizer
    assert np.nanmin(curves[-1]) < curves[0, 0]


def test_offline_data():
    digits = datasets.digits()
    assert digits["images"].shape == (1797, 64) and set(np.unique(digits["labels"])) == set(range(10))
    tokens = datasets.stdlib_text()["tokens"]
    assert tokens.size > 100_000 and tokens.min() >= 0 and tokens.max() < datasets.TEXT_VOCAB


def test_heldout_set_is_fixed_covers_families_and_uses_disjoint_seeds():
    first = heldout_tasks(18, ALL_FAMILIES, seed=5)
    assert first == heldout_tasks(18, ALL_FAMILIES, seed=5)
    assert {s.family for s in first} == set(ALL_FAMILIES)
    assert all(HELDOUT_SEEDS[0] <= s.seed < HELDOUT_SEEDS[1] for s in first)
    rng = np.random.default_rng(0)
    train = [sample_training_task(rng, ALL_FAMILIES) for _ in range(500)]
    assert all(TRAIN_SEEDS[0] <= s.seed < TRAIN_SEEDS[1] for s in train)
    assert len({s.family for s in train}) == len(ALL_FAMILIES)


def test_dynamic_settings_do_not_recompile():
    """Two tasks of one bucket with different settings share one compiled program."""
    from selfloop.unroll import task_program

    a, b = _spec_in("digits_mlp", 0, seed=1), _spec_in("digits_mlp", 0, seed=2)
    assert a.dynamic != b.dynamic
    rates = np.asarray([1e-2], np.float32)
    program = task_program("digits_mlp", 0, ADAM)
    learning_curves(a, ADAM, rates, num_steps=9, chunk=10)
    compiled = (program._advance._cache_size(), program._start._cache_size())
    learning_curves(b, ADAM, rates, num_steps=9, chunk=10)
    assert (program._advance._cache_size(), program._start._cache_size()) == compiled


def test_normalize_curve_exact():
    curve = np.array([10.0, 6.0, 2.0, 1.0, np.nan, 30.0])
    np.testing.assert_allclose(normalize_curve(curve, init_loss=10.0, best_loss=2.0), [1.0, 0.5, 0.0, 0.0, 1.5, 1.5])


def test_ratio_to_initial_exact():
    np.testing.assert_allclose(ratio_to_initial(np.array([4.0, 2.0, np.inf, 100.0]), 4.0), [1.0, 0.5, 1.5, 1.5])


def test_adam_sweep_is_the_papers_fifteen_rates():
    assert len(ADAM_LEARNING_RATES) == 15
    np.testing.assert_allclose(ADAM_LEARNING_RATES[0], 1e-6)
    np.testing.assert_allclose(ADAM_LEARNING_RATES[-1], 10.0)
    np.testing.assert_allclose(np.diff(np.log10(ADAM_LEARNING_RATES)), 0.5, rtol=1e-9)


def test_task_keys_are_jax_arrays():
    spec = _spec_in("quadratic", 0)
    assert all(isinstance(v, jax.Array) for v in spec.dynamic_arrays().values())


def test_noisy_quadratic_gradients_are_the_clean_gradient_plus_the_stated_noise():
    """Its loss reads no noise; its gradients average to the clean one, with σ of the family's formula."""
    family = TASK_FAMILIES["noisy_quadratic"]
    spec = _spec_in("noisy_quadratic", 0, seed=3)
    bucket, dyn = family.buckets[0], spec.dynamic_arrays()
    consts = family.make_consts(bucket, dyn, {}, jax.random.PRNGKey(0))
    params = family.init_params(bucket, dyn, consts, jax.random.PRNGKey(1))

    def clean(p):
        return 0.5 * dyn["scale"] * jax.numpy.mean(consts["eigenvalues"] * (p["x"] - consts["optimum"]) ** 2)

    keys = jax.random.split(jax.random.PRNGKey(2), 4000)
    losses = jax.vmap(lambda k: family.loss(bucket, dyn, {}, consts, params, k))(keys)
    np.testing.assert_allclose(losses, clean(params), rtol=1e-6)
    grads = jax.vmap(lambda k: jax.grad(lambda p: family.loss(bucket, dyn, {}, consts, p, k))(params)["x"])(keys)
    sigma = float(family.gradient_noise_std(bucket, dyn, consts))
    clean_grad = jax.grad(clean)(params)["x"]
    assert float(np.sqrt(np.mean(np.square(clean_grad)))) < 1.5 * sigma / float(dyn["noise_ratio"])
    np.testing.assert_allclose(grads.mean(0), clean_grad, atol=5 * sigma / np.sqrt(len(keys)))
    np.testing.assert_allclose(grads.std(0).mean(), sigma, rtol=0.02)


def test_noisy_quadratic_enters_training_episodes_only_at_its_share():
    """Units draw it at ``tasks.noisy_quadratic_share``; the default families,
    and so held-out sets and tournaments, never include it."""
    import dataclasses

    from selfloop.config import USER_FAMILIES, EstimatorConfig, LOptConfig, TasksConfig
    from selfloop.farm.units import UnitContext, slot_task

    assert TasksConfig().families == USER_FAMILIES and "noisy_quadratic" not in USER_FAMILIES
    assert "noisy_quadratic" not in {s.family for s in heldout_tasks(90, TasksConfig().families, seed=1)}
    for share in (0.0, 0.3):
        tasks = dataclasses.replace(TasksConfig(), noisy_quadratic_share=share)
        context = UnitContext(seed=0, lopt=LOptConfig(), estimator=EstimatorConfig(), tasks=tasks)
        drawn = [slot_task(context, member, 0, generation).family for member in range(10) for generation in range(60)]
        assert abs(drawn.count("noisy_quadratic") / len(drawn) - share) < 0.05


def test_delayed_recall_scores_only_positions_with_a_target():
    """With a zero readout every prediction is uniform: the loss is log(vocab) for any
    delay only if the unscored first ``delay`` positions are left out of the mean."""
    family = TASK_FAMILIES["delayed_recall"]
    bucket = family.buckets[0]
    for delay in (1.0, 4.0):
        dyn = {"param_scale": jax.numpy.float32(1.0), "delay": jax.numpy.float32(delay)}
        params = family.init_params(bucket, dyn, {}, jax.random.PRNGKey(0))
        params = {**params, "w_out": 0 * params["w_out"], "b_out": 0 * params["b_out"]}
        loss = family.loss(bucket, dyn, {}, {}, params, jax.random.PRNGKey(1))
        np.testing.assert_allclose(float(loss), np.log(family.vocab), rtol=1e-5)


def test_lowrank_autoencoder_data_spans_rank_directions():
    family = TASK_FAMILIES["lowrank_ae"]
    for rank in (2.0, 5.0):
        dyn = {"rank": jax.numpy.float32(rank)}
        basis = np.asarray(family.make_consts(family.buckets[0], dyn, {}, jax.random.PRNGKey(0))["basis"])
        assert np.linalg.matrix_rank(basis) == rank and not basis[int(rank):].any()
