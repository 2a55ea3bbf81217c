"""Per-parameter MLP learned optimizer.

The small learned optimizer of Metz et al. 2020, "Tasks, stability,
architecture, and compute: Training more effective learned optimizers, and using
them to train themselves" (arXiv:2009.11243), as used by the learned_optimization
library's ``MLPLOpt``. The same MLP is applied to every weight of every tensor:

  inputs (19): gradient g, weight p, momenta m_β for β in DECAYS; each of these
               8 channels normalized per tensor by rsqrt(1e-5 + mean(x²));
               plus 11 unnormalized time features tanh(t/τ - 1), τ in TIMESCALES
  MLP:         19 -> hidden -> hidden -> 2 (ReLU), fan-in scaled init
  update:      p <- p - step_mult * d * exp(exp_mult * m)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from selfloop.lopt.base import LearnedOptimizer, Params, Theta, normalize_per_tensor

DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
TIMESCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)
NUM_INPUTS = 2 + len(DECAYS) + len(TIMESCALES)


@dataclass(frozen=True)
class MLPLOptConfig:
    """Fixed settings of the MLP lopt (hashable: they shape the compiled code)."""

    hidden: int = 32
    step_mult: float = 1e-3
    exp_mult: float = 1e-3


class MLPLOptState(NamedTuple):
    momenta: Params  # same tree as params; each leaf [*param_shape, len(DECAYS)]
    step: jax.Array  # int32 [], updates applied so far


def _dense_init(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    weight = jax.random.normal(key, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in)
    return {"w": weight, "b": jnp.zeros((fan_out,))}


def init_theta(config: MLPLOptConfig, key: jax.Array) -> Theta:
    """Random fan-in scaled weights; there is no pretrained starting point."""
    sizes = (NUM_INPUTS, config.hidden, config.hidden, 2)
    keys = jax.random.split(key, len(sizes) - 1)
    return {f"layer{i}": _dense_init(k, sizes[i], sizes[i + 1]) for i, k in enumerate(keys)}


def init_state(params: Params) -> MLPLOptState:
    momenta = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p) + (len(DECAYS),), jnp.float32), params)
    return MLPLOptState(momenta=momenta, step=jnp.zeros([], jnp.int32))


def time_features(step: jax.Array) -> jax.Array:
    """tanh(t/τ - 1) for every τ in TIMESCALES: shape [len(TIMESCALES)]."""
    t = step.astype(jnp.float32)
    return jnp.tanh(t / jnp.asarray(TIMESCALES, jnp.float32) - 1.0)


def _apply_mlp(theta: Theta, x: jax.Array) -> jax.Array:
    num_layers = len(theta)
    for i in range(num_layers):
        layer = theta[f"layer{i}"]
        x = x @ layer["w"] + layer["b"]
        if i < num_layers - 1:
            x = jax.nn.relu(x)
    return x


def _update_tensor(config, theta, p, g, momentum, time_feats):
    g = jnp.where(jnp.isfinite(g), g, 0.0)
    decays = jnp.asarray(DECAYS, jnp.float32)
    momentum = decays * momentum + (1.0 - decays) * g[..., None]
    channels = jnp.concatenate([g[..., None], p[..., None], momentum], axis=-1)
    channels = normalize_per_tensor(channels)
    times = jnp.broadcast_to(time_feats, p.shape + time_feats.shape)
    out = _apply_mlp(theta, jnp.concatenate([channels, times], axis=-1))
    direction, magnitude = out[..., 0], out[..., 1]
    step = config.step_mult * direction * jnp.exp(config.exp_mult * magnitude)
    return p - step, momentum


def update(
    config: MLPLOptConfig,
    theta: Theta,
    params: Params,
    grads: Params,
    state: MLPLOptState,
) -> tuple[Params, MLPLOptState]:
    """One learned-optimizer step on every tensor of ``params``."""
    time_feats = time_features(state.step)
    treedef = jax.tree_util.tree_structure(params)
    results = [
        _update_tensor(config, theta, p, g, m, time_feats)
        for p, g, m in zip(
            jax.tree_util.tree_leaves(params),
            jax.tree_util.tree_leaves(grads),
            treedef.flatten_up_to(state.momenta),
        )
    ]
    new_params = jax.tree_util.tree_unflatten(treedef, [r[0] for r in results])
    new_momenta = jax.tree_util.tree_unflatten(treedef, [r[1] for r in results])
    return new_params, MLPLOptState(momenta=new_momenta, step=state.step + 1)


def make_mlp_lopt(config: MLPLOptConfig = MLPLOptConfig()) -> LearnedOptimizer:
    """The MLP lopt's pure functions with ``config`` bound."""
    return LearnedOptimizer(
        init_theta=lambda key: init_theta(config, key),
        init_state=init_state,
        # The MLP lopt reads no loss; ``loss`` is accepted for the common interface.
        update=lambda theta, params, grads, state, loss=None: update(config, theta, params, grads, state),
    )
