"""Synthetic problems: quadratics, 2-D test functions, linear and logistic regression.

Every loss is bounded below by 0 (test functions are shifted by their known
minimum) so that ratios to the initial loss mean the same thing in every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from selfloop.tasks.base import log_uniform, minibatch, random_rotation


@dataclass(frozen=True)
class QuadraticBucket:
    dim: int


class Quadratic:
    """0.5·scale·mean_i λ_i (1 + noise·z_i)·(R(x − x*))_i², λ log-spaced to a condition number."""

    name = "quadratic"
    buckets = (QuadraticBucket(dim=10), QuadraticBucket(dim=100))

    def sample_dynamic(self, rng, bucket):
        return {
            "log10_cond": float(rng.uniform(0.0, 4.0)),
            "scale": log_uniform(rng, 1e-3, 1e3),
            "noise": float(rng.choice([0.0, rng.uniform(0.0, 0.9)])),
        }

    def dataset(self, bucket):
        return {}

    def make_consts(self, bucket, dyn, data, key):
        k_rot, k_opt = jax.random.split(key)
        exponents = jnp.linspace(0.0, 1.0, bucket.dim) * dyn["log10_cond"]
        return {
            "eigenvalues": 10.0**exponents,
            "rotation": random_rotation(k_rot, bucket.dim),
            "optimum": jax.random.normal(k_opt, (bucket.dim,)),
        }

    def init_params(self, bucket, dyn, consts, key):
        return {"x": jax.random.normal(key, (bucket.dim,))}

    def loss(self, bucket, dyn, data, consts, params, key):
        y = consts["rotation"] @ (params["x"] - consts["optimum"])
        z = jnp.clip(jax.random.normal(key, (bucket.dim,)), -1.0, 1.0)
        curvature = consts["eigenvalues"] * (1.0 + dyn["noise"] * z)
        return 0.5 * dyn["scale"] * jnp.mean(curvature * y * y)


class NoisyQuadratic(Quadratic):
    """A diagonal quadratic whose gradients carry noise far above their signal.

    The loss is 0.5·scale·mean_i λ_i (x − x*)_i², λ log-spaced to a condition
    number; every gradient adds N(0, σ²) per coordinate, σ = ``noise_ratio``
    times the RMS gradient at a typical initialization (1 to 100), and the
    noise does not shrink as x nears x*. The loss value carries no noise, so
    the meta-objective reads the true loss. This is the regime an outer
    optimizer works in (an ES meta-gradient of a thousand-weight θ whose
    independent estimates barely agree): here a gradient that does not
    persist calls for a short step, which clean inner problems never teach.
    (Zhang et al. 2019, "Which algorithmic choices matter at which batch
    sizes? Insights from a noisy quadratic model", study the same problem.)
    Its data and initialization are the quadratic's.
    """

    name = "noisy_quadratic"
    buckets = (QuadraticBucket(dim=100), QuadraticBucket(dim=1000))

    def sample_dynamic(self, rng, bucket):
        return {
            "log10_cond": float(rng.uniform(0.0, 3.0)),
            "scale": log_uniform(rng, 1e-3, 1e3),
            "noise_ratio": log_uniform(rng, 1.0, 100.0),
        }

    def make_consts(self, bucket, dyn, data, key):
        k_order, k_opt = jax.random.split(key)
        exponents = jax.random.permutation(k_order, jnp.linspace(0.0, 1.0, bucket.dim)) * dyn["log10_cond"]
        return {"eigenvalues": 10.0**exponents, "optimum": jax.random.normal(k_opt, (bucket.dim,))}

    def gradient_noise_std(self, bucket, dyn, consts):
        """σ: ``noise_ratio`` times the RMS clean gradient at x, x* ~ N(0, I) (E[(x − x*)²] = 2)."""
        clean_rms = dyn["scale"] / bucket.dim * jnp.sqrt(2.0 * jnp.mean(jnp.square(consts["eigenvalues"])))
        return dyn["noise_ratio"] * clean_rms

    def loss(self, bucket, dyn, data, consts, params, key):
        x = params["x"]
        y = x - consts["optimum"]
        clean = 0.5 * dyn["scale"] * jnp.mean(consts["eigenvalues"] * y * y)
        noise = self.gradient_noise_std(bucket, dyn, consts) * jax.random.normal(key, (bucket.dim,))
        # Zero in value, ``noise`` in gradient.
        return clean + jnp.sum(noise * (x - jax.lax.stop_gradient(x)))


def _rosenbrock(xy):
    x, y = xy[0], xy[1]
    return (1.0 - x) ** 2 + 100.0 * (y - x * x) ** 2


def _beale(xy):
    x, y = xy[0], xy[1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def _ackley(xy):
    radius = jnp.sqrt(0.5 * jnp.sum(xy * xy))
    return -20.0 * jnp.exp(-0.2 * radius) - jnp.exp(0.5 * jnp.sum(jnp.cos(2.0 * jnp.pi * xy))) + jnp.e + 20.0


_STYBLINSKI_TANG_MIN = -39.16616570377142 * 2


def _styblinski_tang(xy):
    return 0.5 * jnp.sum(xy**4 - 16.0 * xy**2 + 5.0 * xy) - _STYBLINSKI_TANG_MIN


def _rotated_bowl(xy):
    return 0.5 * (xy[0] ** 2 + 30.0 * xy[1] ** 2)


TEST_FUNCTIONS = (_rosenbrock, _beale, _ackley, _styblinski_tang, _rotated_bowl)


class TestFunction2D:
    """Classic 2-D optimization test functions, rotated, each with minimum 0."""

    name = "test2d"
    buckets = (None,)

    def sample_dynamic(self, rng, bucket):
        return {
            "function": float(rng.integers(len(TEST_FUNCTIONS))),
            "angle": float(rng.uniform(0.0, 2.0 * np.pi)),
        }

    def dataset(self, bucket):
        return {}

    def make_consts(self, bucket, dyn, data, key):
        c, s = jnp.cos(dyn["angle"]), jnp.sin(dyn["angle"])
        return {"rotation": jnp.array([[c, -s], [s, c]])}

    def init_params(self, bucket, dyn, consts, key):
        return {"xy": jax.random.uniform(key, (2,), minval=-2.0, maxval=2.0)}

    def loss(self, bucket, dyn, data, consts, params, key):
        index = jnp.clip(dyn["function"].astype(jnp.int32), 0, len(TEST_FUNCTIONS) - 1)
        xy = consts["rotation"] @ params["xy"]
        return jax.lax.switch(index, TEST_FUNCTIONS, xy)


@dataclass(frozen=True)
class RegressionBucket:
    examples: int
    dim: int
    batch: int


def _conditioned_design(key, bucket, log10_cond):
    """Design matrix whose feature scales span ``10**log10_cond``, rotated."""
    k_x, k_rot = jax.random.split(key)
    scales = 10.0 ** (-jnp.linspace(0.0, 1.0, bucket.dim) * log10_cond / 2)
    z = jax.random.normal(k_x, (bucket.examples, bucket.dim))
    return (z * scales) @ random_rotation(k_rot, bucket.dim)


class _LinearModel:
    """A linear model w·x + b on a conditioned design; subclasses pick the targets and loss."""

    buckets = (RegressionBucket(examples=512, dim=32, batch=32),)

    def dataset(self, bucket):
        return {}

    def init_params(self, bucket, dyn, consts, key):
        return {"w": jnp.zeros((bucket.dim,)), "b": jnp.zeros(())}

    def _predict(self, bucket, consts, params, key):
        """(predictions, targets) on the minibatch ``key`` selects."""
        idx = minibatch(key, bucket.examples, bucket.batch)
        return consts["x"][idx] @ params["w"] + params["b"], consts["y"][idx]


class LinearRegression(_LinearModel):
    """Minibatch least squares with controlled conditioning and label noise."""

    name = "linreg"

    def sample_dynamic(self, rng, bucket):
        return {"log10_cond": float(rng.uniform(0.0, 3.0)), "noise": float(rng.uniform(0.0, 0.5))}

    def make_consts(self, bucket, dyn, data, key):
        k_x, k_w, k_n = jax.random.split(key, 3)
        x = _conditioned_design(k_x, bucket, dyn["log10_cond"])
        w = jax.random.normal(k_w, (bucket.dim,))
        y = x @ w + dyn["noise"] * jax.random.normal(k_n, (bucket.examples,))
        return {"x": x, "y": y}

    def loss(self, bucket, dyn, data, consts, params, key):
        prediction, target = self._predict(bucket, consts, params, key)
        return jnp.mean((prediction - target) ** 2)


class LogisticRegression(_LinearModel):
    """Minibatch binary logistic regression with controlled conditioning."""

    name = "logreg"

    def sample_dynamic(self, rng, bucket):
        return {"log10_cond": float(rng.uniform(0.0, 3.0)), "flip": float(rng.uniform(0.0, 0.1))}

    def make_consts(self, bucket, dyn, data, key):
        k_x, k_w, k_f = jax.random.split(key, 3)
        x = _conditioned_design(k_x, bucket, dyn["log10_cond"])
        w = jax.random.normal(k_w, (bucket.dim,))
        clean = (x @ w > 0).astype(jnp.float32)
        flipped = jax.random.uniform(k_f, (bucket.examples,)) < dyn["flip"]
        return {"x": x, "y": jnp.where(flipped, 1.0 - clean, clean)}

    def loss(self, bucket, dyn, data, consts, params, key):
        logits, labels = self._predict(bucket, consts, params, key)
        return jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)
