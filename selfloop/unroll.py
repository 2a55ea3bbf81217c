"""Compiled inner-training programs: one per (task family, bucket, optimizer).

An inner optimizer is any pair ``init_state(params)`` /
``update(hyper, params, grads, state)``: a learned optimizer (``hyper`` = its
weights θ) or the Adam baseline (``hyper`` = a learning rate). A program runs a
*batch* of such optimizers side by side on one task (antithetic ES pairs,
population members, Adam learning rates): inner steps under ``lax.scan``, the
batch under ``vmap``, inner states donated. ``advance_vjp`` is the reverse
mode of one chunk of ``advance`` for one learned optimizer, which the "grad"
estimator chains backwards over a truncation.

Randomness is a pure function of (task seed, episode, step): every member of a
batch sees the same data, and a segment can be replayed bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from selfloop.tasks import TASK_FAMILIES
from selfloop.tasks.base import TaskSpec
from selfloop.tasks.normalize import differentiable_ratio


class InnerOptimizer(NamedTuple):
    """``init_state(params)`` and ``update(hyper, params, grads, state, loss)``."""

    init_state: Callable[[Any], Any]
    update: Callable[[Any, Any, Any, Any], tuple[Any, Any]]


class Episode(NamedTuple):
    """Where one inner problem stands; shared by every member of a batch."""

    consts: Any  # per-episode problem constants (rotation, teacher, ...)
    step: jax.Array  # int32 [], inner steps taken in this episode
    index: jax.Array  # int32 [], episode number of this task
    horizon: jax.Array  # int32 [], steps after which the episode resets
    init_loss: jax.Array  # float32 [], loss at step 0 (meta-loss normalizer)


class InnerState(NamedTuple):
    params: Any  # the task's weights; leaves [batch, ...] inside a program
    opt_state: Any  # the inner optimizer's state for them


def _data_key(seed: jax.Array, episode: jax.Array, step: jax.Array) -> jax.Array:
    key = jax.random.fold_in(jax.random.PRNGKey(seed), episode)
    return jax.random.fold_in(jax.random.fold_in(key, 0x5EED), step)


def _horizon(key: jax.Array, episode: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
    """Log-uniform horizon; the first episode is cut short at random so that
    tasks started together do not reset in lockstep."""
    k_len, k_stagger = jax.random.split(key)
    length = jnp.exp(jax.random.uniform(k_len, (), minval=jnp.log(low), maxval=jnp.log(high)))
    stagger = jnp.where(episode == 0, jax.random.uniform(k_stagger, ()), 1.0)
    return jnp.maximum(1, (length * stagger).astype(jnp.int32))


class TaskProgram:
    """Jitted start/advance functions for one family bucket and one optimizer."""

    def __init__(self, family_name: str, bucket_index: int, optimizer: InnerOptimizer):
        family = TASK_FAMILIES[family_name]
        bucket = family.buckets[bucket_index]
        self.family, self.bucket, self.optimizer = family, bucket, optimizer
        # Concrete even when first built inside a trace (a checkpoint's shapes
        # are checked with eval_shape): this object is cached for the process.
        with jax.ensure_compile_time_eval():
            self.data = jax.tree_util.tree_map(jnp.asarray, family.dataset(bucket))
        self._start = jax.jit(self._start_impl)
        self._advance = jax.jit(self._advance_impl, static_argnums=(0,), donate_argnums=(2,))
        self._advance_vjp = jax.jit(self._advance_vjp_impl, static_argnums=(0,))

    def _loss(self, dyn, data, consts, params, key):
        return self.family.loss(self.bucket, dyn, data, consts, params, key)

    def _start_impl(self, seed, episode, dyn, data, horizon_low, horizon_high):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), episode)
        k_consts, k_init, k_horizon = jax.random.split(key, 3)
        consts = self.family.make_consts(self.bucket, dyn, data, k_consts)
        params = self.family.init_params(self.bucket, dyn, consts, k_init)
        init_loss = self._loss(dyn, data, consts, params, _data_key(seed, episode, 0))
        state = Episode(
            consts=consts,
            step=jnp.zeros([], jnp.int32),
            index=jnp.asarray(episode, jnp.int32),
            horizon=_horizon(k_horizon, episode, horizon_low, horizon_high),
            init_loss=init_loss,
        )
        return state, InnerState(params, self.optimizer.init_state(params))

    def _advance_impl(self, num_steps, hypers, inners, episode, seed, dyn, data):
        def one_member(hyper, inner, key):
            loss, grads = jax.value_and_grad(lambda p: self._loss(dyn, data, episode.consts, p, key))(inner.params)
            params, opt_state = self.optimizer.update(hyper, inner.params, grads, inner.opt_state, loss)
            return InnerState(params, opt_state), loss

        def step(carry, _):
            inners, step_index = carry
            key = _data_key(seed, episode.index, step_index)
            inners, losses = jax.vmap(one_member, in_axes=(0, 0, None))(hypers, inners, key)
            return (inners, step_index + 1), losses

        (inners, step_index), losses = jax.lax.scan(step, (inners, episode.step), None, length=num_steps)
        return inners, episode._replace(step=step_index), losses

    def _advance_vjp_impl(self, num_steps, hyper, inners, episode, seed, dyn, data, clip, weight, cotangent):
        """Pull ``cotangent`` (of the inner state's floating leaves after the
        chunk) and the gradient of weight·Σ_t ratio_to_initial(ℓ_t) back through the chunk:
        d/d hyper and d/d(floating leaves of the state before it). Reverse mode
        one chunk at a time, so a truncation of any length backpropagates
        through one compiled chunk length with the state of every chunk
        boundary the only memory it keeps."""
        leaves, treedef = jax.tree_util.tree_flatten(inners)
        floating = [jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves]

        def chunk(hyper, floats):
            pending = iter(floats)
            merged = [next(pending) if is_float else x for x, is_float in zip(leaves, floating)]
            batched = jax.tree_util.tree_map(lambda x: x[None], hyper)
            out, _, losses = self._advance_impl(num_steps, batched, jax.tree_util.tree_unflatten(treedef, merged),
                                                episode, seed, dyn, data)
            out_floats = [x for x, is_float in zip(jax.tree_util.tree_leaves(out), floating) if is_float]
            return out_floats, weight * jnp.sum(differentiable_ratio(losses, episode.init_loss, clip))

        floats = [x for x, is_float in zip(leaves, floating) if is_float]
        (_, meta_loss), pull_back = jax.vjp(chunk, hyper, floats)
        d_hyper, d_floats = pull_back((cotangent, jnp.ones_like(meta_loss)))
        return d_hyper, d_floats

    def start(self, spec: TaskSpec, episode: int, horizon: tuple[float, float] = (1.0, 2.0)):
        """A fresh episode of ``spec``: its ``Episode`` and one unbatched ``InnerState``."""
        return self._start(
            np.int32(spec.seed),
            np.int32(episode),
            spec.dynamic_arrays(),
            self.data,
            np.float32(horizon[0]),
            np.float32(horizon[1]),
        )

    def advance(self, spec: TaskSpec, hypers, inners: InnerState, episode: Episode, num_steps: int):
        """Run ``num_steps`` inner steps for every batch member.

        Args:
          hypers: pytree with a leading batch axis (θ per member, or learning rates).
          inners: ``InnerState`` with the same leading batch axis; donated.
        Returns:
          (inners, episode, losses) where ``losses[t, b]`` is member b's loss
          before its t-th step of this call.
        """
        return self._advance(num_steps, hypers, inners, episode, np.int32(spec.seed), spec.dynamic_arrays(), self.data)

    def advance_vjp(self, spec: TaskSpec, hyper, inners: InnerState, episode: Episode, num_steps: int,
                    clip: float, weight: float, cotangent: list):
        """The vector-Jacobian product of ``advance`` for one member (``inners``
        with a batch axis of 1, ``hyper`` without one) and the meta-loss
        weight·Σ_t ratio_to_initial(ℓ_t) of its steps; see ``_advance_vjp_impl``.
        Returns (d/d hyper, cotangent of the floating leaves of ``inners``)."""
        return self._advance_vjp(num_steps, hyper, inners, episode, np.int32(spec.seed), spec.dynamic_arrays(),
                                 self.data, np.float32(clip), np.float32(weight), cotangent)


@functools.cache
def task_program(family_name: str, bucket_index: int, optimizer: InnerOptimizer) -> TaskProgram:
    """The cached program: built (and compiled on first use) once per process."""
    return TaskProgram(family_name, bucket_index, optimizer)


def broadcast_batch(tree: Any, size: int) -> Any:
    """Stack ``size`` copies of every leaf along a new leading axis."""
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (size, *jnp.shape(x))), tree)


def learning_curves(
    spec: TaskSpec,
    optimizer: InnerOptimizer,
    hypers: Any,
    num_steps: int,
    chunk: int,
) -> np.ndarray:
    """Train a fresh episode 0 of ``spec`` with each hyper in the batch.

    Returns:
      float64 [num_steps + 1, batch]: the loss before each step, then the loss
      after the last step.
    """
    program = task_program(spec.family, spec.bucket, optimizer)
    batch = jax.tree_util.tree_leaves(hypers)[0].shape[0]
    episode, inner = program.start(spec, 0)
    inners = broadcast_batch(inner, batch)
    pieces = []
    # One step beyond num_steps reads the loss after the last update; whole
    # chunks only, so that one compiled length serves every call.
    for _ in range(-(-(num_steps + 1) // chunk)):
        inners, episode, losses = program.advance(spec, hypers, inners, episode, chunk)
        pieces.append(np.asarray(losses, dtype=np.float64))
    return np.concatenate(pieces, axis=0)[: num_steps + 1]
