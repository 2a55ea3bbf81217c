"""Per-parameter MLP learned optimizer.

The small learned optimizer of Metz et al. 2020, "Tasks, stability,
architecture, and compute: Training more effective learned optimizers, and using
them to train themselves" (arXiv:2009.11243), as used by the learned_optimization
library's ``MLPLOpt``. The same MLP is applied to every weight of every tensor:

  inputs (19): gradient g, weight p, momenta m_β for β in DECAYS; each of these
               8 channels normalized per tensor by rsqrt(1e-5 + mean(x²));
               plus 11 unnormalized time features tanh(t/τ - 1), τ in TIMESCALES
               (23 with ``features="adaptive"``, 25 with "scaled": see below)
  MLP:         inputs -> hidden -> hidden -> 2 (ReLU), fan-in scaled init
  update:      p <- p - step_mult * d * exp(exp_mult * m)

Four settings change what the MLP can express, not the update formula:

- ``features="relative"``: g and the momenta share one scale per tensor, a
  running RMS of the tensor's gradients (``GRAD_SCALE_DECAY``), instead of each
  channel being normalized on its own. Per-channel normalization blows decayed
  or averaged-out momenta back up to unit size, so pure noise, or no gradient
  at all, looks like a strong consistent signal; relative to a running scale,
  momenta of noise are small and momenta of a vanished gradient fade.
- ``features="adaptive"``: the relative channels, plus g and the momenta
  m_β for β in ADAPTIVE_DECAYS each divided by the weight's own running RMS
  gradient (an EMA of the squared relative gradient, decay
  GRAD_SCALE_DECAY, bias-corrected). Per-tensor scales cannot tell a weight
  whose gradient is always large from one whose gradient is always small;
  per-weight scales can, which is what makes Adam's steps per weight the
  right length. These channels let the MLP learn steps of that kind (or any
  other function of them); they are inputs, not an update rule. (The small
  MLP lopt of Metz et al. 2022, "Practical tradeoffs between memory,
  compute, and performance in learned optimizers", arXiv:2203.11860, feeds
  factored second-moment features for the same purpose.)
- ``features="scaled"``: the adaptive channels, plus two per tensor that
  carry absolute size, log10 of the tensor's parameter RMS and of its
  running gradient RMS (``scale_channels``). Every other channel is scale-free,
  so the step the MLP takes, step_mult·d·exp(m) in parameter units, cannot
  depend on how large a task's weights or gradients are: it is one learned
  step size for every task, as Adam's is, where the best rate differs by
  orders of magnitude between tasks. These channels let the MLP learn a
  step size per tensor from what it sees (the hierarchical lopt's per-tensor
  log ‖g‖ and log ‖p‖ serve the same purpose). They are even in the
  gradient, so ``odd`` still holds.
- ``odd=True``: d is an odd and m an even function of the gradient channels
  (the MLP is evaluated on ±(g, m_β) with p and time unchanged, and d, m are
  the odd and even parts of its outputs): flipping the sign of every gradient
  flips the step, and no gradient means no step. Without
  it the MLP's biases and the weight channel give a step that does not depend
  on the gradient (a learned weight decay), which erodes a learned optimizer
  that is itself being trained on a noisy meta-gradient.
  (Harrison et al. 2022, "A Closer Look at Learned Optimization: Stability,
  Robustness, and Inductive Biases", argue for such built-in biases.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from selfloop.lopt.base import LearnedOptimizer, Params, Theta, normalize_per_tensor

DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
TIMESCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)
NUM_INPUTS = 2 + len(DECAYS) + len(TIMESCALES)
ADAPTIVE_DECAYS = (0.5, 0.9, 0.99)  # momenta that "adaptive" features also give per-weight normalized
NUM_ADAPTIVE = 1 + len(ADAPTIVE_DECAYS)  # and g itself
PER_WEIGHT_FEATURES = ("adaptive", "scaled")  # the feature kinds with the per-weight channels and state
NUM_SCALE = 2  # "scaled": log10 of the tensor's parameter RMS and of its running gradient RMS
SCALE_FLOOR = 1e-12  # the size a zero tensor (a bias at initialization) is read as
SCALE_DIVISOR = 4.0  # log10 sizes from 1e-12 to 1e4 become inputs from -3 to 1
GRAD_SCALE_DECAY = 0.999  # the running gradient RMS that "relative" features are measured against
FEATURE_CLIP = 100.0  # relative features of a gradient that jumps far above its running scale


@dataclass(frozen=True)
class MLPLOptConfig:
    """Fixed settings of the MLP lopt (hashable: they shape the compiled code)."""

    hidden: int = 32
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    features: str = "per_tensor"  # or "relative", "adaptive", "scaled": see the module docstring
    odd: bool = False  # d odd, m even in the gradient channels


class MLPLOptState(NamedTuple):
    momenta: Params  # same tree as params; each leaf [*param_shape, len(DECAYS)]
    step: jax.Array  # int32 [], updates applied so far


class RelativeMLPLOptState(NamedTuple):
    """State of the MLP lopt with ``features="relative"``."""

    momenta: Params  # same tree as params; each leaf [*param_shape, len(DECAYS)]
    grad_scale: Params  # same tree; each leaf float32 []: EMA of the tensor's gradient RMS
    scale_weight: jax.Array  # float32 []: EMA of 1 with the same decay (bias correction)
    step: jax.Array  # int32 [], updates applied so far


class AdaptiveMLPLOptState(NamedTuple):
    """State of the MLP lopt with ``features="adaptive"`` or ``"scaled"``."""

    momenta: Params  # same tree as params; each leaf [*param_shape, len(DECAYS)]
    second_moment: Params  # same tree and shapes as params: EMA of the squared relative gradient
    grad_scale: Params  # same tree; each leaf float32 []: EMA of the tensor's gradient RMS
    scale_weight: jax.Array  # float32 []: EMA of 1 with the same decay (bias correction of both EMAs)
    step: jax.Array  # int32 [], updates applied so far


def num_inputs(config: MLPLOptConfig) -> int:
    per_weight = NUM_ADAPTIVE if config.features in PER_WEIGHT_FEATURES else 0
    return NUM_INPUTS + per_weight + (NUM_SCALE if config.features == "scaled" else 0)


def _dense_init(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    weight = jax.random.normal(key, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in)
    return {"w": weight, "b": jnp.zeros((fan_out,))}


def init_theta(config: MLPLOptConfig, key: jax.Array) -> Theta:
    """Random fan-in scaled weights; there is no pretrained starting point."""
    sizes = (num_inputs(config), config.hidden, config.hidden, 2)
    keys = jax.random.split(key, len(sizes) - 1)
    return {f"layer{i}": _dense_init(k, sizes[i], sizes[i + 1]) for i, k in enumerate(keys)}


def init_state(params: Params) -> MLPLOptState:
    momenta = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p) + (len(DECAYS),), jnp.float32), params)
    return MLPLOptState(momenta=momenta, step=jnp.zeros([], jnp.int32))


def init_relative_state(params: Params) -> RelativeMLPLOptState:
    plain = init_state(params)
    grad_scale = jax.tree_util.tree_map(lambda p: jnp.zeros([], jnp.float32), params)
    return RelativeMLPLOptState(plain.momenta, grad_scale, jnp.zeros([], jnp.float32), plain.step)


def init_adaptive_state(params: Params) -> AdaptiveMLPLOptState:
    relative = init_relative_state(params)
    second_moment = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return AdaptiveMLPLOptState(relative.momenta, second_moment, relative.grad_scale, relative.scale_weight,
                                relative.step)


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


def tensor_rms(x: jax.Array) -> jax.Array:
    """sqrt(mean(x²)) of a finite tensor without overflow or underflow in float32."""
    scale = jnp.max(jnp.abs(x))
    return scale * jnp.sqrt(jnp.mean(jnp.square(x / jnp.where(scale > 0, scale, 1.0))))


def relative_channels(g: jax.Array, momentum: jax.Array, grad_scale: jax.Array) -> jax.Array:
    """[g, m_β...] / grad_scale, clipped to ±FEATURE_CLIP; zero while no gradient was ever seen."""
    channels = jnp.concatenate([g[..., None], momentum], axis=-1)
    relative = channels / jnp.where(grad_scale > 0, grad_scale, 1.0)
    return jnp.clip(jnp.where(grad_scale > 0, relative, 0.0), -FEATURE_CLIP, FEATURE_CLIP)


def adaptive_channels(relative: jax.Array, unbiased_second: jax.Array) -> jax.Array:
    """g and the ADAPTIVE_DECAYS momenta of ``relative`` (the relative channels)
    over the weight's own RMS relative gradient, clipped to ±FEATURE_CLIP;
    zero for a weight that never had a gradient."""
    picks = [0] + [1 + DECAYS.index(decay) for decay in ADAPTIVE_DECAYS]
    rms = jnp.sqrt(unbiased_second)[..., None]
    per_weight = relative[..., picks] / jnp.where(rms > 0, rms, 1.0)
    return jnp.clip(jnp.where(rms > 0, per_weight, 0.0), -FEATURE_CLIP, FEATURE_CLIP)


def scale_channels(p: jax.Array, unbiased_grad_scale: jax.Array) -> jax.Array:
    """log10 of the tensor's parameter RMS and running gradient RMS, over
    SCALE_DIVISOR: shape [NUM_SCALE]."""
    sizes = jnp.stack([tensor_rms(p), unbiased_grad_scale])
    return jnp.log10(jnp.maximum(sizes, SCALE_FLOOR)) / SCALE_DIVISOR


def _step_from_features(config, theta, gradient_channels, p, time_feats, tensor_feats=None):
    """The MLP's step from the gradient channels (last axis), p's channel, time
    and per-tensor features even in the gradient (``tensor_feats``, optional)."""
    per_tensor = time_feats if tensor_feats is None else jnp.concatenate([time_feats, tensor_feats])
    per_tensor = jnp.broadcast_to(per_tensor, p.shape + per_tensor.shape)
    weight = normalize_per_tensor(p[..., None])
    others = jnp.concatenate([weight, per_tensor], axis=-1)
    if config.odd:
        signed = jnp.stack([gradient_channels, -gradient_channels])
        out = _apply_mlp(theta, jnp.concatenate([signed, jnp.broadcast_to(others, (2, *others.shape))], axis=-1))
        direction = 0.5 * (out[0, ..., 0] - out[1, ..., 0])
        magnitude = 0.5 * (out[0, ..., 1] + out[1, ..., 1])
    else:
        # Channel order of the original lopt: g, p, momenta, time.
        inputs = [gradient_channels[..., :1], weight, gradient_channels[..., 1:], per_tensor]
        out = _apply_mlp(theta, jnp.concatenate(inputs, axis=-1))
        direction, magnitude = out[..., 0], out[..., 1]
    return config.step_mult * direction * jnp.exp(config.exp_mult * magnitude)


def _new_momentum(g, momentum):
    decays = jnp.asarray(DECAYS, jnp.float32)
    return decays * momentum + (1.0 - decays) * g[..., None]


def _update_tensor(config, theta, p, g, momentum, time_feats):
    g = jnp.where(jnp.isfinite(g), g, 0.0)
    momentum = _new_momentum(g, momentum)
    gradient_channels = jnp.concatenate([g[..., None], momentum], axis=-1)
    gradient_channels = normalize_per_tensor(gradient_channels)
    return p - _step_from_features(config, theta, gradient_channels, p, time_feats), momentum


def _debiased(ema, scale_weight):
    """An EMA started at zero, divided by the same EMA of 1 (Adam's bias correction)."""
    return ema / jnp.maximum(scale_weight, 1e-12)


def _relative_inputs(g, momentum, grad_scale, scale_weight):
    """The relative channels after gradient ``g``, with the new momentum and running scale."""
    g = jnp.where(jnp.isfinite(g), g, 0.0)
    momentum = _new_momentum(g, momentum)
    grad_scale = GRAD_SCALE_DECAY * grad_scale + (1.0 - GRAD_SCALE_DECAY) * tensor_rms(g)
    return relative_channels(g, momentum, _debiased(grad_scale, scale_weight)), momentum, grad_scale


def _update_tensor_relative(config, theta, p, g, momentum, grad_scale, scale_weight, time_feats):
    gradient_channels, momentum, grad_scale = _relative_inputs(g, momentum, grad_scale, scale_weight)
    return p - _step_from_features(config, theta, gradient_channels, p, time_feats), momentum, grad_scale


def _update_tensor_adaptive(config, theta, p, g, momentum, second, grad_scale, scale_weight, time_feats):
    relative, momentum, grad_scale = _relative_inputs(g, momentum, grad_scale, scale_weight)
    # Relative, not raw, squared gradients: finite for gradients of 1e-30 or 1e30.
    second = GRAD_SCALE_DECAY * second + (1.0 - GRAD_SCALE_DECAY) * jnp.square(relative[..., 0])
    per_weight = adaptive_channels(relative, _debiased(second, scale_weight))
    gradient_channels = jnp.concatenate([relative, per_weight], axis=-1)
    sizes = scale_channels(p, _debiased(grad_scale, scale_weight)) if config.features == "scaled" else None
    step = _step_from_features(config, theta, gradient_channels, p, time_feats, sizes)
    return p - step, momentum, second, grad_scale


def _map_tensors(fn, params: Params, *per_weight: Params) -> tuple[Params, ...]:
    """``fn(p, g, ...)`` on every tensor of ``params`` and the same leaves of
    ``per_weight`` trees (whose leaves may carry extra trailing axes); the
    tuple ``fn`` returns per tensor, as one tree per element."""
    treedef = jax.tree_util.tree_structure(params)
    leaves = [jax.tree_util.tree_leaves(params)] + [treedef.flatten_up_to(tree) for tree in per_weight]
    results = [fn(*tensor) for tensor in zip(*leaves)]
    return tuple(jax.tree_util.tree_unflatten(treedef, list(column)) for column in zip(*results))


def update(
    config: MLPLOptConfig,
    theta: Theta,
    params: Params,
    grads: Params,
    state: MLPLOptState,
) -> tuple[Params, MLPLOptState]:
    """One learned-optimizer step on every tensor of ``params``."""
    if config.features == "relative":
        return update_relative(config, theta, params, grads, state)
    if config.features in PER_WEIGHT_FEATURES:
        return update_adaptive(config, theta, params, grads, state)
    time_feats = time_features(state.step)
    new_params, momenta = _map_tensors(
        lambda p, g, m: _update_tensor(config, theta, p, g, m, time_feats), params, grads, state.momenta
    )
    return new_params, MLPLOptState(momenta=momenta, step=state.step + 1)


def _update_with_running_scale(update_tensor, params: Params, grads: Params, state, *per_weight: Params):
    """``update_tensor(p, g, *per-weight state, scale_weight, time features)`` on
    every tensor, for the feature kinds that keep a running gradient scale:
    the tuple of new trees it returns per tensor, and the new scale weight."""
    time_feats = time_features(state.step)
    scale_weight = GRAD_SCALE_DECAY * state.scale_weight + (1.0 - GRAD_SCALE_DECAY)
    new_trees = _map_tensors(
        lambda p, g, *tensor_state: update_tensor(p, g, *tensor_state, scale_weight, time_feats),
        params, grads, *per_weight,
    )
    return new_trees, scale_weight


def update_relative(
    config: MLPLOptConfig,
    theta: Theta,
    params: Params,
    grads: Params,
    state: RelativeMLPLOptState,
) -> tuple[Params, RelativeMLPLOptState]:
    """``update`` with relative features (the state carries the gradient scales)."""
    (new_params, momenta, grad_scale), scale_weight = _update_with_running_scale(
        functools.partial(_update_tensor_relative, config, theta), params, grads, state,
        state.momenta, state.grad_scale,
    )
    return new_params, RelativeMLPLOptState(momenta, grad_scale, scale_weight, state.step + 1)


def update_adaptive(
    config: MLPLOptConfig,
    theta: Theta,
    params: Params,
    grads: Params,
    state: AdaptiveMLPLOptState,
) -> tuple[Params, AdaptiveMLPLOptState]:
    """``update`` with adaptive or scaled features (the state also carries per-weight second moments)."""
    (new_params, momenta, second, grad_scale), scale_weight = _update_with_running_scale(
        functools.partial(_update_tensor_adaptive, config, theta), params, grads, state,
        state.momenta, state.second_moment, state.grad_scale,
    )
    return new_params, AdaptiveMLPLOptState(momenta, second, grad_scale, scale_weight, state.step + 1)


# The feature kinds (``MLPLOptConfig.features``) and the state each keeps.
INIT_STATE = {"per_tensor": init_state, "relative": init_relative_state,
              **{kind: init_adaptive_state for kind in PER_WEIGHT_FEATURES}}


def make_mlp_lopt(config: MLPLOptConfig = MLPLOptConfig()) -> LearnedOptimizer:
    """The MLP lopt's pure functions with ``config`` bound."""
    if config.features not in INIT_STATE:
        raise ValueError(f"MLP lopt features must be one of {list(INIT_STATE)}, not {config.features!r}")
    return LearnedOptimizer(
        init_theta=lambda key: init_theta(config, key),
        init_state=INIT_STATE[config.features],
        # The MLP lopt reads no loss; ``loss`` is accepted for the common interface.
        update=lambda theta, params, grads, state, loss=None: update(config, theta, params, grads, state),
    )
