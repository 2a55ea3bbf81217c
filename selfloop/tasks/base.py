"""Task interface: a family of inner training problems.

A family is a set of pure functions specialised by a static *bucket* (shapes:
widths, batch sizes, dimensions) and by *dynamic* settings (scales,
activations, conditioning) passed as traced scalars. Compilation happens once
per bucket; everything varied inside a bucket costs no recompilation.

A concrete task is a ``TaskSpec``: a plain, hashable host record that names its
family, bucket, seed and dynamic settings. Each episode of a task derives its
constants (a rotation, a teacher network, a design matrix) and its initial
weights from the seed and the episode number, so a spec and two integers
reproduce any inner problem exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Consts = Any
Data = Any
Dynamic = dict[str, jax.Array]


@dataclass(frozen=True)
class TaskSpec:
    """One inner problem: which family and bucket, which seed, which settings."""

    family: str
    bucket: int
    seed: int
    dynamic: tuple[tuple[str, float], ...]

    def dynamic_arrays(self) -> Dynamic:
        return {name: jnp.float32(value) for name, value in self.dynamic}

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v:.3g}" for k, v in self.dynamic)
        return f"{self.family}[{self.bucket}] seed={self.seed} ({settings})"


class TaskFamily(Protocol):
    """What a task family provides. Implementations hold no traced state."""

    name: str
    buckets: tuple[Any, ...]

    def sample_dynamic(self, rng: np.random.Generator, bucket: Any) -> dict[str, float]:
        """Draw the traced settings of one task (floats; integers as floats)."""

    def dataset(self, bucket: Any) -> Data:
        """Host arrays the loss reads (an empty dict when there are none)."""

    def make_consts(self, bucket: Any, dyn: Dynamic, data: Data, key: jax.Array) -> Consts:
        """Per-episode constants of the problem instance."""

    def init_params(self, bucket: Any, dyn: Dynamic, consts: Consts, key: jax.Array) -> Params:
        """Initial weights of the inner model."""

    def loss(self, bucket: Any, dyn: Dynamic, data: Data, consts: Consts, params: Params, key: jax.Array) -> jax.Array:
        """Scalar training loss on the minibatch that ``key`` selects."""


# ---------------------------------------------------------------- shared parts

ACTIVATIONS = (jax.nn.relu, jnp.tanh, jax.nn.sigmoid, jax.nn.gelu, jax.nn.elu)


def activation(index: jax.Array, x: jax.Array) -> jax.Array:
    """Apply the activation that the traced float ``index`` selects."""
    branch = jnp.clip(index.astype(jnp.int32), 0, len(ACTIVATIONS) - 1)
    return jax.lax.switch(branch, ACTIVATIONS, x)


def init_mlp(key: jax.Array, sizes: tuple[int, ...], param_scale: jax.Array) -> Params:
    """Fan-in initialized MLP stored reparameterized: effective weight = p * scale.

    Weight reparameterization (Metz et al. 2020's augmentation) changes the
    curvature the optimizer sees without changing the function at init.
    """
    keys = jax.random.split(key, len(sizes) - 1)
    params = {}
    for i, k in enumerate(keys):
        w = jax.random.normal(k, (sizes[i], sizes[i + 1])) / jnp.sqrt(sizes[i])
        params[f"layer{i}"] = {"w": w / param_scale, "b": jnp.zeros((sizes[i + 1],))}
    return params


def apply_mlp(params: Params, x: jax.Array, act_index: jax.Array, param_scale: jax.Array) -> jax.Array:
    """Forward pass of ``init_mlp``'s network; no activation after the last layer."""
    num_layers = len(params)
    for i in range(num_layers):
        layer = params[f"layer{i}"]
        x = x @ (layer["w"] * param_scale) + layer["b"] * param_scale
        if i < num_layers - 1:
            x = activation(act_index, x)
    return x


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy over the labels' positions; with ``weights`` (broadcast
    to the labels' shape), their weighted mean: 0 leaves a position out."""
    log_probs = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    if weights is None:
        return -jnp.mean(picked)
    weights = jnp.broadcast_to(weights, picked.shape)
    return -jnp.sum(picked * weights) / jnp.sum(weights)


def minibatch(key: jax.Array, num_examples: int, batch: int) -> jax.Array:
    return jax.random.randint(key, (batch,), 0, num_examples)


def random_rotation(key: jax.Array, dim: int) -> jax.Array:
    q, r = jnp.linalg.qr(jax.random.normal(key, (dim, dim)))
    return q * jnp.sign(jnp.diag(r))


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))
