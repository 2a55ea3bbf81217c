"""The interface every learned optimizer implements.

A learned optimizer (lopt) is a pair of pure functions over pytrees, in the
style of optax: ``init_state(params)`` and ``update(theta, params, grads,
state)``. The same two functions train a task's weights and, during
self-training, another population member's lopt weights: an outer optimizer is
nothing but a lopt applied to a θ as if θ were a model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Params = Any  # a pytree of arrays
Theta = Any  # a pytree of arrays: the learned optimizer's own weights
LOptState = Any  # per-weight optimizer state (momenta, step counter, ...)


class LearnedOptimizer(NamedTuple):
    """Pure functions of a learned optimizer architecture.

    Attributes:
      init_theta: ``key -> theta``: a random initialization of the lopt weights.
      init_state: ``params -> state``: the per-weight state for a new model.
      update: ``(theta, params, grads, state, loss=None) -> (params, state)``:
        one step; ``loss`` is the training loss at ``params`` (architectures
        that read it treat None or NaN as unknown). The state has a ``step``
        field: the count of updates applied, read by the time features.
    """

    init_theta: Callable[[jax.Array], Theta]
    init_state: Callable[[Params], LOptState]
    update: Callable[..., tuple[Params, LOptState]]


def normalize_per_tensor(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """``x * rsqrt(eps + mean(x**2))`` over all axes but the last (the channel).

    Computed on ``x / max|x|`` so that gradients of 1e-30 or 1e30 stay finite in
    float32: mathematically identical to the plain formula wherever that one is
    finite.
    """
    reduce_axes = tuple(range(x.ndim - 1))
    x = jnp.where(jnp.isfinite(x), x, 0.0)
    scale = jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True)
    safe_scale = jnp.where(scale > 0, scale, 1.0)
    unit = x / safe_scale
    mean_square = jnp.mean(unit * unit, axis=reduce_axes, keepdims=True)
    # eps / scale**2 without overflow: clip scale from below before squaring.
    eps_term = eps / jnp.maximum(safe_scale, 1e-18) ** 2
    return unit * jax.lax.rsqrt(eps_term + mean_square)


def tree_l2_norm(tree: Any) -> jax.Array:
    """Euclidean norm of all leaves of a pytree taken together."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in leaves))


def tree_all_finite(tree: Any) -> jax.Array:
    """True when every element of every leaf is finite."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))
