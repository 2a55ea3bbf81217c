"""Meta-gradient estimators over truncated unrolls of persistent inner problems.

- "es": antithetic truncated evolution strategies. Each segment starts every
  pair from the same carried state; ĝ = mean_p (L⁺_p − L⁻_p)/(2σ²)·ε_p; the
  positive state of pair 0 is carried forward.
- "pes": persistent evolution strategies (Vicol, Metz, Sohl-Dickstein 2021,
  "Unbiased gradient estimation in unrolled computation graphs with persistent
  evolution strategies"). Every ± particle keeps its own state across
  segments and an accumulator A_p of its past perturbations in this episode;
  ĝ = mean_p (L⁺_p − L⁻_p)·(A_p + ε_p)/(2σ²); A resets with the episode.
- "grad": truncated backpropagation: ĝ = dL/dθ of the segment's meta-loss
  through its K inner steps (second-order terms included), from the carried
  state, as the truncated gradient of Metz et al. 2019 ("Understanding and
  correcting pathologies in the training of learned optimizers"). No
  perturbation, so no noise that grows with θ's dimension: two ES estimates
  of P pairs agree at best with cosine P/|θ| even where every task agreed;
  its price is the truncation's bias and gradients that can grow with K
  where the inner dynamics are chaotic. Each task's gradient is scaled to
  unit length: near chaos a few tasks' gradients are orders of magnitude
  longer than the rest (beyond float32's range of squares at K = 80) and
  would otherwise be the whole meta-batch (``estimator.grad_weight``:
  "meta_loss" then weighs it by the segment's meta-loss, "none" keeps the
  gradient as backpropagated). A non-finite gradient is dropped (zeros).

L± is the mean over the segment of ℓ(t)/ℓ_init clipped to [0, clip]: a
non-finite inner loss becomes the clip value, never a NaN gradient. With
``estimator.standardize`` (ES and PES) the differences L⁺_p − L⁻_p are divided
by their RMS over the pairs: one task's estimate has the same size whatever
the task.
With ``estimator.outlier_clip`` the master shortens a round's outlying
estimates to a multiple of their median length (``clip_outliers``). Inner
problems are replaced at a segment boundary once their sampled horizon has
passed or their weights stopped being finite (``needs_reset``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from selfloop.config import EstimatorConfig
from selfloop.lopt.base import LearnedOptimizer, tree_all_finite, tree_l2_norm
from selfloop.tasks.base import TaskSpec
from selfloop.tasks.normalize import ratio_to_initial
from selfloop.unroll import Episode, InnerOptimizer, InnerState, broadcast_batch, task_program


class SlotState(NamedTuple):
    """One persistent inner problem of a member, with its ± particles."""

    episode: Episode
    # PES: leaves [2P, ...], + particles first, then − particles. ES carries one
    # state (leaves [1, ...]) that every particle starts each segment from.
    inners: InnerState
    accumulator: Any  # θ-shaped leaves [P, ...]: PES perturbation sum (zeros for ES)


class GradientEstimate(NamedTuple):
    gradient: Any  # θ-shaped meta-gradient estimate
    meta_loss: float  # mean of L⁺ and L⁻ over pairs
    slot: SlotState  # the advanced inner problem


def as_inner_optimizer(lopt: LearnedOptimizer) -> InnerOptimizer:
    return InnerOptimizer(init_state=lopt.init_state, update=lopt.update)


def _zeros_like_batched(theta: Any, size: int) -> Any:
    return jax.tree_util.tree_map(lambda x: jnp.zeros((size, *x.shape), x.dtype), theta)


def new_slot(
    lopt: LearnedOptimizer,
    spec: TaskSpec,
    theta: Any,
    config: EstimatorConfig,
    horizon: tuple[float, float],
    episode: int = 0,
) -> SlotState:
    """Start episode ``episode`` of ``spec`` for all 2P particles."""
    program = task_program(spec.family, spec.bucket, as_inner_optimizer(lopt))
    state, inner = program.start(spec, episode, horizon)
    return SlotState(
        episode=state,
        inners=broadcast_batch(inner, _carried_particles(config)),
        accumulator=_zeros_like_batched(theta, config.pairs),
    )


@functools.partial(jax.jit, static_argnums=(2,))
def _perturbations(theta: Any, key: jax.Array, pairs: int, std: float):
    """ε_p ~ N(0, std²I) and the particle weights [θ+ε_1..θ+ε_P, θ−ε_1..θ−ε_P]."""
    leaves, treedef = jax.tree_util.tree_flatten(theta)
    keys = jax.random.split(key, len(leaves))
    eps = [std * jax.random.normal(k, (pairs, *x.shape), x.dtype) for k, x in zip(keys, leaves)]
    particles = [jnp.concatenate([x + e, x - e]) for x, e in zip(leaves, eps)]
    unflatten = functools.partial(jax.tree_util.tree_unflatten, treedef)
    return unflatten(eps), unflatten(particles)


@jax.jit
def _weighted_mean(weights: Any, coefficients: jax.Array) -> Any:
    """mean_p coefficients[p] * weights[p] for every leaf."""
    return jax.tree_util.tree_map(lambda w: jnp.tensordot(coefficients, w, axes=1) / coefficients.shape[0], weights)


_all_finite = jax.jit(tree_all_finite)
_tree_add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b))


def standardized(difference: np.ndarray) -> np.ndarray:
    """``difference`` over its RMS (``estimator.standardize``); zeros when every
    pair tied (a task on which θ makes no difference carries no direction)."""
    rms = float(np.sqrt(np.mean(np.square(difference))))
    return difference / rms if rms > 1e-12 else np.zeros_like(difference)


def clip_outliers(estimates: dict[int, list[Any]], factor: float) -> tuple[dict[int, list[Any]], int]:
    """Every estimate longer than ``factor`` times the median length of all of
    them shortened to that length, its direction kept (``estimator.outlier_clip``),
    and how many were shortened. ``factor`` 0 returns them as they are."""
    if factor <= 0:
        return estimates, 0  # off (the default): no norms measured on every round
    norms = {key: [float(tree_l2_norm(e)) for e in group] for key, group in estimates.items()}
    flat = [n for group in norms.values() for n in group]
    if not flat:
        return estimates, 0
    limit = factor * float(np.median(flat))
    clipped, shortened = {}, 0
    for key, group in estimates.items():
        clipped[key] = []
        for estimate, norm in zip(group, norms[key]):
            if norm > limit > 0:
                shortened += 1
                estimate = jax.tree_util.tree_map(lambda x, s=limit / norm: (x * s).astype(x.dtype), estimate)
            clipped[key].append(estimate)
    return clipped, shortened


def needs_reset(slot: SlotState) -> bool:
    """True once the episode's horizon has passed or its weights are non-finite."""
    episode = slot.episode
    return int(episode.step) >= int(episode.horizon) or not bool(_all_finite(slot.inners.params))


def inner_steps_per_unit(config: EstimatorConfig, truncation: int) -> int:
    """Inner training steps one work unit computes: every ES/PES particle runs
    the truncation; "grad" runs it once forward and once more under the
    vector-Jacobian product (whose backward pass this count leaves out)."""
    return 2 * truncation if config.kind == "grad" else 2 * config.pairs * truncation


def _carried_particles(config: EstimatorConfig) -> int:
    return 2 * config.pairs if config.kind == "pes" else 1


@functools.partial(jax.jit, static_argnums=(1,))
def _first_particle_everywhere(inners: InnerState, particles: int) -> InnerState:
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x[0], (particles, *x.shape[1:])), inners)


@jax.jit
def _first_particle_only(inners: InnerState) -> InnerState:
    return jax.tree_util.tree_map(lambda x: x[:1], inners)


def estimate_gradient(
    lopt: LearnedOptimizer,
    theta: Any,
    spec: TaskSpec,
    slot: SlotState,
    truncation: int,
    config: EstimatorConfig,
    horizon: tuple[float, float],
    key: jax.Array,
) -> GradientEstimate:
    """Advance one inner problem by ``truncation`` steps and estimate dL/dθ.

    The caller replaces a slot for which ``needs_reset`` holds before calling.
    """
    if truncation % config.chunk:
        raise ValueError(f"truncation {truncation} is not a multiple of estimator.chunk={config.chunk}")
    program = task_program(spec.family, spec.bucket, as_inner_optimizer(lopt))
    if config.kind == "grad":
        return _backpropagated_gradient(program, theta, spec, slot, truncation, config)
    # Fresh buffers: the unroll donates its inputs, and the caller's slot must
    # stay valid so that a retried unit computes the same result.
    if config.kind == "es":
        inners = _first_particle_everywhere(slot.inners, 2 * config.pairs)
    else:
        inners = jax.tree_util.tree_map(jnp.array, slot.inners)
    episode = slot.episode

    eps, particles = _perturbations(theta, key, config.pairs, config.std)
    meta_loss_sum = np.zeros(2 * config.pairs)
    init_loss = float(episode.init_loss)  # fixed within an episode: read once, not per chunk
    for _ in range(truncation // config.chunk):
        inners, episode, losses = program.advance(spec, particles, inners, episode, config.chunk)
        meta_loss_sum += ratio_to_initial(np.asarray(losses), init_loss, config.meta_loss_clip).sum(axis=0)
    meta_loss = meta_loss_sum / truncation
    difference = meta_loss[: config.pairs] - meta_loss[config.pairs :]
    if config.standardize:
        difference = standardized(difference)
    coefficients = jnp.asarray(difference / (2.0 * config.std**2), jnp.float32)

    if config.kind == "pes":
        accumulator = _tree_add(slot.accumulator, eps)
        gradient = _weighted_mean(accumulator, coefficients)
    else:
        accumulator = slot.accumulator
        gradient = _weighted_mean(eps, coefficients)
        inners = _first_particle_only(inners)  # the + particle of pair 0 carries on
    new_slot_state = SlotState(episode=episode, inners=inners, accumulator=accumulator)
    return GradientEstimate(gradient, float(meta_loss.mean()), new_slot_state)


@jax.jit
def _finite_or_zeros(tree: Any) -> Any:
    finite = tree_all_finite(tree)
    return jax.tree_util.tree_map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), tree)


@jax.jit
def _unit_length(tree: Any) -> Any:
    """``tree`` / its L2 norm (zeros stay zeros), computed on tree / max|tree| so
    that a gradient beyond float32's range of squares keeps its direction."""
    peak = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree)]))
    scaled = jax.tree_util.tree_map(lambda x: x / jnp.where(peak > 0, peak, 1.0), tree)
    norm = tree_l2_norm(scaled)
    return jax.tree_util.tree_map(lambda x: x / jnp.where(norm > 0, norm, 1.0), scaled)


def _backpropagated_gradient(program, theta: Any, spec: TaskSpec, slot: SlotState, truncation: int,
                             config: EstimatorConfig) -> GradientEstimate:
    """``estimator.kind = "grad"``: forward through the segment chunk by chunk,
    keeping each chunk's starting state, then reverse mode chunk by chunk from
    the last one, the state's cotangent carried back across chunk boundaries."""
    hypers = broadcast_batch(theta, 1)
    inners, episode = slot.inners, slot.episode
    boundaries = []
    meta_loss_sum = 0.0
    init_loss = float(episode.init_loss)
    for _ in range(truncation // config.chunk):
        # The unroll donates a copy: this chunk's starting state (the
        # caller's slot for the first) stays valid for the reverse pass.
        boundaries.append((inners, episode))
        donated = jax.tree_util.tree_map(jnp.array, inners)
        inners, episode, losses = program.advance(spec, hypers, donated, episode, config.chunk)
        meta_loss_sum += float(ratio_to_initial(np.asarray(losses), init_loss, config.meta_loss_clip).sum())
    cotangent = [jnp.zeros_like(x) for x in jax.tree_util.tree_leaves(inners)
                 if jnp.issubdtype(x.dtype, jnp.inexact)]
    gradient = jax.tree_util.tree_map(jnp.zeros_like, theta)
    for start_inners, start_episode in reversed(boundaries):
        d_theta, cotangent = program.advance_vjp(spec, theta, start_inners, start_episode, config.chunk,
                                                 config.meta_loss_clip, 1.0 / truncation, cotangent)
        gradient = _tree_add(gradient, d_theta)
    meta_loss = meta_loss_sum / truncation
    gradient = _finite_or_zeros(gradient)
    if config.grad_weight != "none":
        gradient = _unit_length(gradient)
    if config.grad_weight == "meta_loss":
        gradient = jax.tree_util.tree_map(lambda x: x * jnp.float32(meta_loss), gradient)
    new_slot_state = SlotState(episode=episode, inners=inners, accumulator=slot.accumulator)
    return GradientEstimate(gradient, meta_loss, new_slot_state)
