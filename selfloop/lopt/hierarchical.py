"""Hierarchical learned optimizer: a per-tensor LSTM feeding a per-parameter MLP.

The paper's architecture (Metz et al. 2020, "Tasks, stability, architecture,
and compute", §3), on the same pure ``init_theta`` / ``init_state``
/ ``update`` interface as the MLP lopt, so it trains tasks and, as an outer
optimizer, other members' weights through the same code path.

Per step, for every tensor of the model:

1. Dynamic gradient clipping: g is clipped to ±``clip_mult`` × an EMA of the
   tensor's rms(g) (no clipping before the EMA exists).
2. Per-parameter accumulators: momenta m_β (β in ``DECAYS``) and second
   moments v_β (β in ``RMS_DECAYS``).
3. The per-tensor LSTM (weights shared by all tensors, run on all tensors at
   once) reads tensor statistics: log|mean m_β|, log var m_β and log mean
   √v_β, log ‖g‖ and ‖p‖ (per size), the training-loss features (log ℓ minus
   its EMAs: scale-free), and the 16 values its tensor's MLP pooled at the
   previous step. It emits ``LSTM_TO_MLP`` values for that tensor.
4. The per-parameter MLP reads per-tensor-normalized g, p, m_β, √v_β and
   m_β/√v_0.999, the tensor's LSTM values and the 11 time features. Of its
   outputs, 2 make the step p ← p − step_mult·d·exp(exp_mult·m) and
   ``POOLED`` are mean-pooled over the tensor for the LSTM's next step.

When no loss is given (``loss=None`` or NaN) the loss features are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from selfloop.lopt.base import LearnedOptimizer, Params, Theta, normalize_per_tensor
from selfloop.lopt.mlp import DECAYS, time_features

RMS_DECAYS = (0.5, 0.9, 0.999)
LOSS_DECAYS = (0.5, 0.9, 0.99)
POOLED = 16  # MLP outputs mean-pooled back into the LSTM
LSTM_TO_MLP = 17  # per-tensor values the LSTM hands every parameter of its tensor
TIME_FEATURES = 11
# Per-parameter channels: g, p, m_β, √v_β, m_β/√v_0.999.
PARAM_CHANNELS = 2 + len(DECAYS) + len(RMS_DECAYS) + len(DECAYS)
MLP_INPUTS = PARAM_CHANNELS + LSTM_TO_MLP + TIME_FEATURES
# Tensor statistics: per momentum log|mean| and log var, per second moment log mean √v,
# log rms(g), log rms(p), the loss features, the pooled MLP outputs.
LSTM_INPUTS = 2 * len(DECAYS) + len(RMS_DECAYS) + 2 + len(LOSS_DECAYS) + POOLED
EPS = 1e-8


@dataclass(frozen=True)
class HierarchicalConfig:
    lstm_hidden: int = 64
    mlp_hidden: int = 32
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    clip_mult: float = 10.0  # dynamic gradient clipping at this many EMA-rms(g)
    clip_decay: float = 0.99


class TensorState(NamedTuple):
    momenta: jax.Array  # [*shape, len(DECAYS)]
    second_moments: jax.Array  # [*shape, len(RMS_DECAYS)]
    lstm_h: jax.Array  # [lstm_hidden]
    lstm_c: jax.Array  # [lstm_hidden]
    pooled: jax.Array  # [POOLED]: this tensor's MLP outputs pooled at the previous step
    grad_rms_ema: jax.Array  # []: EMA of rms(g), for clipping (0 before the first step)


class HierarchicalState(NamedTuple):
    tensors: Any  # same tree as params, TensorState leaves
    loss_log_ema: jax.Array  # [len(LOSS_DECAYS)]: EMAs of log ℓ
    step: jax.Array  # int32 []


def _dense(key: jax.Array, fan_in: int, fan_out: int, scale: float = 2.0) -> dict[str, jax.Array]:
    return {"w": jax.random.normal(key, (fan_in, fan_out)) * jnp.sqrt(scale / fan_in), "b": jnp.zeros((fan_out,))}


def init_theta(config: HierarchicalConfig, key: jax.Array) -> Theta:
    """Random weights only: LSTM (input, recurrent, bias), its readout, the MLP."""
    keys = jax.random.split(key, 6)
    hidden = config.lstm_hidden
    return {
        "lstm": {
            "wx": jax.random.normal(keys[0], (LSTM_INPUTS, 4 * hidden)) * jnp.sqrt(1.0 / LSTM_INPUTS),
            "wh": jax.random.normal(keys[1], (hidden, 4 * hidden)) * jnp.sqrt(1.0 / hidden),
            "b": jnp.zeros((4 * hidden,)),
        },
        "readout": _dense(keys[2], hidden, LSTM_TO_MLP, scale=1.0),
        "mlp0": _dense(keys[3], MLP_INPUTS, config.mlp_hidden),
        "mlp1": _dense(keys[4], config.mlp_hidden, config.mlp_hidden),
        "mlp2": _dense(keys[5], config.mlp_hidden, 2 + POOLED, scale=1.0),
    }


def init_state(config: HierarchicalConfig, params: Params) -> HierarchicalState:
    def tensor_state(p):
        shape = jnp.shape(p)
        return TensorState(
            momenta=jnp.zeros(shape + (len(DECAYS),), jnp.float32),
            second_moments=jnp.zeros(shape + (len(RMS_DECAYS),), jnp.float32),
            lstm_h=jnp.zeros((config.lstm_hidden,), jnp.float32),
            lstm_c=jnp.zeros((config.lstm_hidden,), jnp.float32),
            pooled=jnp.zeros((POOLED,), jnp.float32),
            grad_rms_ema=jnp.zeros([], jnp.float32),
        )

    return HierarchicalState(
        tensors=jax.tree_util.tree_map(tensor_state, params),
        loss_log_ema=jnp.zeros((len(LOSS_DECAYS),), jnp.float32),
        step=jnp.zeros([], jnp.int32),
    )


GRAD_LIMIT = 1e15  # beyond this g² overflows float32 sums; no real gradient gets here after dynamic clipping


def _rms(x: jax.Array, axis=None) -> jax.Array:
    """sqrt(mean(x²)) computed on x/max|x|, so that 1e30 entries do not overflow."""
    scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    safe = jnp.where(scale > 0, scale, 1.0)
    rms = jnp.sqrt(jnp.mean(jnp.square(x / safe), axis=axis, keepdims=True)) * safe
    return (jnp.squeeze(rms, axis) if axis is not None else jnp.squeeze(rms)) + EPS


def _log_abs(x: jax.Array) -> jax.Array:
    return jnp.log(jnp.abs(x) + EPS)


def _accumulate(config, g, p, ts: TensorState):
    """Clip g dynamically; update this tensor's momenta and second moments."""
    g = jnp.clip(jnp.where(jnp.isfinite(g), g, 0.0), -GRAD_LIMIT, GRAD_LIMIT)
    limit = config.clip_mult * ts.grad_rms_ema
    g = jnp.where(ts.grad_rms_ema > 0, jnp.clip(g, -limit, limit), g)
    rms = _rms(g)
    grad_rms_ema = jnp.where(ts.grad_rms_ema > 0, config.clip_decay * ts.grad_rms_ema + (1 - config.clip_decay) * rms,
                             rms)  # fmt: skip
    decays = jnp.asarray(DECAYS, jnp.float32)
    rms_decays = jnp.asarray(RMS_DECAYS, jnp.float32)
    momenta = decays * ts.momenta + (1.0 - decays) * g[..., None]
    second = rms_decays * ts.second_moments + (1.0 - rms_decays) * jnp.square(g)[..., None]
    return g, momenta, second, grad_rms_ema


def _tensor_statistics(g, p, momenta, second, pooled, loss_features) -> jax.Array:
    axes = tuple(range(p.ndim))
    mean_m = jnp.mean(momenta, axis=axes)
    log_var_m = 2.0 * jnp.log(_rms(momenta - mean_m, axis=axes))
    mean_rms = jnp.mean(jnp.sqrt(second + EPS * EPS), axis=axes)
    stats = jnp.concatenate([
        _log_abs(mean_m), log_var_m, jnp.log(mean_rms + EPS),
        jnp.stack([jnp.log(_rms(g)), jnp.log(_rms(p))]), loss_features, pooled,
    ])  # fmt: skip
    # Log statistics span ~±40; a fixed scale keeps the LSTM's inputs O(1).
    return jnp.clip(stats / 10.0, -5.0, 5.0)


def _lstm(theta, x: jax.Array, h: jax.Array, c: jax.Array):
    """One LSTM step for every tensor at once: x [T, in], h and c [T, hidden]."""
    gates = x @ theta["wx"] + h @ theta["wh"] + theta["b"]
    i, f, o, u = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(u)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return h, c


def _mlp(theta, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(x @ theta["mlp0"]["w"] + theta["mlp0"]["b"])
    x = jax.nn.relu(x @ theta["mlp1"]["w"] + theta["mlp1"]["b"])
    return x @ theta["mlp2"]["w"] + theta["mlp2"]["b"]


def _loss_features(loss, loss_log_ema, step):
    """log ℓ minus each EMA of log ℓ (scale-free), and the updated EMAs."""
    valid = jnp.isfinite(loss) & (loss > 0)
    log_loss = jnp.log(jnp.where(valid, loss, 1.0))
    decays = jnp.asarray(LOSS_DECAYS, jnp.float32)
    first = step == 0
    ema = jnp.where(first, log_loss, decays * loss_log_ema + (1 - decays) * log_loss)
    features = jnp.where(valid & ~first, jnp.clip(log_loss - loss_log_ema, -5.0, 5.0), 0.0)
    return features, jnp.where(valid, ema, loss_log_ema)


def update(config: HierarchicalConfig, theta: Theta, params: Params, grads: Params, state: HierarchicalState,
           loss: jax.Array | None = None) -> tuple[Params, HierarchicalState]:  # fmt: skip
    """One step on every tensor of ``params``; ``loss`` is the training loss before it (optional)."""
    loss = jnp.float32(jnp.nan) if loss is None else jnp.asarray(loss, jnp.float32)
    loss_features, loss_log_ema = _loss_features(loss, state.loss_log_ema, state.step)
    treedef = jax.tree_util.tree_structure(params)
    leaves = jax.tree_util.tree_leaves(params)
    grad_leaves = jax.tree_util.tree_leaves(grads)
    tensor_states = treedef.flatten_up_to(state.tensors)
    accumulated = [_accumulate(config, g, p, ts) for p, g, ts in zip(leaves, grad_leaves, tensor_states)]

    stats = jnp.stack([
        _tensor_statistics(g, p, m, v, ts.pooled, loss_features)
        for p, (g, m, v, _), ts in zip(leaves, accumulated, tensor_states)
    ])  # fmt: skip
    h, c = _lstm(theta["lstm"], stats, jnp.stack([ts.lstm_h for ts in tensor_states]),
                 jnp.stack([ts.lstm_c for ts in tensor_states]))  # fmt: skip
    to_mlp = jnp.tanh(h @ theta["readout"]["w"] + theta["readout"]["b"])  # [tensors, LSTM_TO_MLP]
    times = time_features(state.step)

    new_params, new_states = [], []
    for k, (p, (g, momenta, second, grad_rms_ema)) in enumerate(zip(leaves, accumulated)):
        root = jnp.sqrt(second + EPS * EPS)
        channels = jnp.concatenate([g[..., None], p[..., None], momenta, root, momenta / root[..., -1:]], axis=-1)
        per_tensor = jnp.concatenate([to_mlp[k], times])
        inputs = jnp.concatenate(
            [normalize_per_tensor(channels), jnp.broadcast_to(per_tensor, p.shape + per_tensor.shape)], axis=-1
        )
        out = _mlp(theta, inputs)
        step = config.step_mult * out[..., 0] * jnp.exp(config.exp_mult * out[..., 1])
        new_params.append(p - step)
        pooled = jnp.mean(out[..., 2:].reshape(-1, POOLED), axis=0)
        new_states.append(TensorState(momenta, second, h[k], c[k], jnp.tanh(pooled), grad_rms_ema))
    return (
        jax.tree_util.tree_unflatten(treedef, new_params),
        HierarchicalState(jax.tree_util.tree_unflatten(treedef, new_states), loss_log_ema, state.step + 1),
    )


def make_hierarchical_lopt(config: HierarchicalConfig = HierarchicalConfig()) -> LearnedOptimizer:
    return LearnedOptimizer(
        init_theta=lambda key: init_theta(config, key),
        init_state=lambda params: init_state(config, params),
        update=lambda theta, params, grads, state, loss=None: update(config, theta, params, grads, state, loss),
    )
