"""Neural-network problems: teacher-student regression, a low-rank autoencoder,
2-D toy classification, 8x8 digit classification, a digit autoencoder, a
character-level RNN LM and an RNN that recalls delayed tokens.

Activations and a weight reparameterization scale are drawn per task and passed
traced, so they vary inside a bucket without recompiling.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from selfloop.tasks import datasets
from selfloop.tasks.base import (
    ACTIVATIONS,
    apply_mlp,
    init_mlp,
    log_uniform,
    minibatch,
    softmax_cross_entropy,
)

# Weight reparameterization range (Metz et al. 2020 use 0.01-100). Kept within
# one decade each way: wider ranges make the earliest, random-optimizer phase
# of self-training mostly noise.
PARAM_SCALE_RANGE = (0.1, 10.0)


def _network_dynamic(rng: np.random.Generator) -> dict[str, float]:
    return {
        "activation": float(rng.integers(len(ACTIVATIONS))),
        "param_scale": log_uniform(rng, *PARAM_SCALE_RANGE),
    }


@dataclass(frozen=True)
class MLPBucket:
    hidden: tuple[int, ...]
    batch: int


class TeacherStudent:
    """Regress a random tanh teacher MLP with a student MLP on Gaussian inputs."""

    name = "teacher_student"
    buckets = (MLPBucket(hidden=(32,), batch=32),)
    input_dim, output_dim, teacher_width = 8, 4, 16

    def sample_dynamic(self, rng, bucket):
        return _network_dynamic(rng)

    def dataset(self, bucket):
        return {}

    def make_consts(self, bucket, dyn, data, key):
        sizes = (self.input_dim, self.teacher_width, self.output_dim)
        return {"teacher": init_mlp(key, sizes, jnp.float32(1.0))}

    def init_params(self, bucket, dyn, consts, key):
        sizes = (self.input_dim, *bucket.hidden, self.output_dim)
        return init_mlp(key, sizes, dyn["param_scale"])

    def loss(self, bucket, dyn, data, consts, params, key):
        x = jax.random.normal(key, (bucket.batch, self.input_dim))
        tanh_index = jnp.float32(ACTIVATIONS.index(jnp.tanh))
        target = apply_mlp(consts["teacher"], x, tanh_index, jnp.float32(1.0))
        prediction = apply_mlp(params, x, dyn["activation"], dyn["param_scale"])
        return jnp.mean((prediction - target) ** 2)


class LowRankAutoencoder:
    """Reconstruct Gaussian data near a random low-dimensional subspace through
    an MLP bottleneck: an autoencoder on synthetic data.

    An autoencoding family that is not digits_ae, so that a run holding out
    digits_ae can still train on reconstruction losses (opt-in: not in the
    default families, whose held-out set it would change).
    """

    name = "lowrank_ae"
    buckets = (MLPBucket(hidden=(8,), batch=32),)
    data_dim, max_rank = 32, 8

    def sample_dynamic(self, rng, bucket):
        return {**_network_dynamic(rng), "rank": float(rng.integers(2, self.max_rank + 1)),
                "noise": float(rng.uniform(0.01, 0.3))}  # fmt: skip

    def dataset(self, bucket):
        return {}

    def make_consts(self, bucket, dyn, data, key):
        basis = jax.random.normal(key, (self.max_rank, self.data_dim)) / jnp.sqrt(dyn["rank"])
        used = (jnp.arange(self.max_rank) < dyn["rank"])[:, None]  # the first ``rank`` directions span the data
        return {"basis": basis * used}

    def init_params(self, bucket, dyn, consts, key):
        return init_mlp(key, (self.data_dim, *bucket.hidden, self.data_dim), dyn["param_scale"])

    def loss(self, bucket, dyn, data, consts, params, key):
        k_latent, k_noise = jax.random.split(key)
        latent = jax.random.normal(k_latent, (bucket.batch, self.max_rank))
        x = latent @ consts["basis"] + dyn["noise"] * jax.random.normal(k_noise, (bucket.batch, self.data_dim))
        reconstruction = apply_mlp(params, x, dyn["activation"], dyn["param_scale"])
        return jnp.mean((reconstruction - x) ** 2)


def _toy_points(kind: jax.Array, noise: jax.Array, key: jax.Array, n: int):
    """2-D two-class data: 0 spirals, 1 moons, 2 circles, 3 blobs."""
    k_t, k_n, k_y = jax.random.split(key, 3)
    label = (jax.random.uniform(k_y, (n,)) < 0.5).astype(jnp.int32)
    t = jax.random.uniform(k_t, (n,))
    sign = 2.0 * label - 1.0

    def spirals():
        angle = 3.0 * jnp.pi * t
        radius = 0.2 + t
        return sign[:, None] * jnp.stack([radius * jnp.cos(angle), radius * jnp.sin(angle)], 1)

    def moons():
        angle = jnp.pi * t
        upper = jnp.stack([jnp.cos(angle), jnp.sin(angle)], 1)
        lower = jnp.stack([1.0 - jnp.cos(angle), 0.5 - jnp.sin(angle)], 1)
        return jnp.where(label[:, None] == 1, lower, upper)

    def circles():
        angle = 2.0 * jnp.pi * t
        radius = jnp.where(label == 1, 0.5, 1.0)
        return radius[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], 1)

    def blobs():
        return sign[:, None] * jnp.array([[1.0, 0.5]])

    points = jax.lax.switch(jnp.clip(kind.astype(jnp.int32), 0, 3), (spirals, moons, circles, blobs))
    return points + noise * jax.random.normal(k_n, (n, 2)), label


@dataclass(frozen=True)
class ToyBucket:
    examples: int
    hidden: tuple[int, ...]
    batch: int


class Toy2DClassification:
    """Spirals, moons, circles or blobs classified by a small MLP."""

    name = "toy2d"
    buckets = (ToyBucket(examples=512, hidden=(32, 32), batch=64),)

    def sample_dynamic(self, rng, bucket):
        return {
            **_network_dynamic(rng),
            "dataset": float(rng.integers(4)),
            "noise": float(rng.uniform(0.02, 0.3)),
        }

    def dataset(self, bucket):
        return {}

    def make_consts(self, bucket, dyn, data, key):
        x, y = _toy_points(dyn["dataset"], dyn["noise"], key, bucket.examples)
        return {"x": x, "y": y}

    def init_params(self, bucket, dyn, consts, key):
        return init_mlp(key, (2, *bucket.hidden, 2), dyn["param_scale"])

    def loss(self, bucket, dyn, data, consts, params, key):
        idx = minibatch(key, bucket.examples, bucket.batch)
        logits = apply_mlp(params, consts["x"][idx], dyn["activation"], dyn["param_scale"])
        return softmax_cross_entropy(logits, consts["y"][idx])


class _DigitsNetwork:
    """An MLP on the 8x8 digits; subclasses choose the output and the loss."""

    outputs: int

    def sample_dynamic(self, rng, bucket):
        return _network_dynamic(rng)

    def dataset(self, bucket):
        return datasets.digits()

    def make_consts(self, bucket, dyn, data, key):
        return {}

    def init_params(self, bucket, dyn, consts, key):
        return init_mlp(key, (64, *bucket.hidden, self.outputs), dyn["param_scale"])

    def _forward(self, bucket, dyn, data, params, key):
        """(network output, images, labels) on the minibatch ``key`` selects."""
        idx = minibatch(key, data["images"].shape[0], bucket.batch)
        images = data["images"][idx]
        return apply_mlp(params, images, dyn["activation"], dyn["param_scale"]), images, data["labels"][idx]


class DigitsMLP(_DigitsNetwork):
    """Classify the real 8x8 handwritten digits with an MLP."""

    name = "digits_mlp"
    buckets = (MLPBucket(hidden=(32,), batch=32), MLPBucket(hidden=(16, 16), batch=64))
    outputs = 10

    def loss(self, bucket, dyn, data, consts, params, key):
        logits, _, labels = self._forward(bucket, dyn, data, params, key)
        return softmax_cross_entropy(logits, labels)


class DigitsAutoencoder(_DigitsNetwork):
    """Reconstruct 8x8 digits through a narrow MLP bottleneck."""

    name = "digits_ae"
    buckets = (MLPBucket(hidden=(16,), batch=32),)
    outputs = 64

    def loss(self, bucket, dyn, data, consts, params, key):
        reconstruction, images, _ = self._forward(bucket, dyn, data, params, key)
        return jnp.mean((reconstruction - images) ** 2)


@dataclass(frozen=True)
class RNNBucket:
    embed: int
    hidden: int
    sequence: int
    batch: int


def _init_rnn(key: jax.Array, vocab: int, bucket: RNNBucket, scale: jax.Array) -> dict[str, jax.Array]:
    """A token embedding, a tanh RNN cell and a readout to ``vocab`` logits,
    fan-in scaled and stored reparameterized (effective weight = p * scale)."""
    e, h = bucket.embed, bucket.hidden
    k = jax.random.split(key, 4)
    return {
        "embed": jax.random.normal(k[0], (vocab, e)) / scale,
        "w_in": jax.random.normal(k[1], (e, h)) / jnp.sqrt(e) / scale,
        "w_rec": jax.random.normal(k[2], (h, h)) / jnp.sqrt(h) / scale,
        "b": jnp.zeros((h,)),
        "w_out": jax.random.normal(k[3], (h, vocab)) / jnp.sqrt(h) / scale,
        "b_out": jnp.zeros((vocab,)),
    }


def _rnn_logits(params: dict[str, jax.Array], inputs: jax.Array, bucket: RNNBucket, scale: jax.Array) -> jax.Array:
    """Logits [sequence, batch, vocab] of ``_init_rnn``'s network on tokens [batch, sequence]."""
    embedded = (params["embed"] * scale)[inputs]  # [batch, seq, embed]

    def cell(hidden, x_t):
        hidden = jnp.tanh(x_t @ (params["w_in"] * scale) + hidden @ (params["w_rec"] * scale) + params["b"])
        return hidden, hidden

    initial = jnp.zeros((inputs.shape[0], bucket.hidden))
    _, hiddens = jax.lax.scan(cell, initial, jnp.swapaxes(embedded, 0, 1))
    return hiddens @ (params["w_out"] * scale) + params["b_out"]


class CharRNN:
    """Next-character prediction on Python sources with a vanilla tanh RNN."""

    name = "char_rnn"
    buckets = (RNNBucket(embed=8, hidden=24, sequence=16, batch=8),)

    def sample_dynamic(self, rng, bucket):
        return {"param_scale": log_uniform(rng, *PARAM_SCALE_RANGE)}

    def dataset(self, bucket):
        return datasets.stdlib_text()

    def make_consts(self, bucket, dyn, data, key):
        return {}

    def init_params(self, bucket, dyn, consts, key):
        return _init_rnn(key, datasets.TEXT_VOCAB, bucket, dyn["param_scale"])

    def loss(self, bucket, dyn, data, consts, params, key):
        tokens = data["tokens"]
        starts = minibatch(key, tokens.shape[0] - bucket.sequence - 1, bucket.batch)
        offsets = jnp.arange(bucket.sequence + 1)
        window = tokens[starts[:, None] + offsets[None, :]]
        inputs, targets = window[:, :-1], window[:, 1:]
        logits = _rnn_logits(params, inputs, bucket, dyn["param_scale"])
        return softmax_cross_entropy(logits, jnp.swapaxes(targets, 0, 1))


class DelayedRecall:
    """Recall the token seen ``delay`` steps earlier in a random sequence, with a
    vanilla tanh RNN: synthetic data, a memory the recurrence must learn to keep.

    A recurrent family that is not a language model, so that a run holding out
    char_rnn can still train on recurrent gradients (opt-in: not in the default
    families, whose held-out set it would change).
    """

    name = "delayed_recall"
    buckets = (RNNBucket(embed=8, hidden=24, sequence=16, batch=16),)
    vocab, max_delay = 8, 4

    def sample_dynamic(self, rng, bucket):
        return {"param_scale": log_uniform(rng, *PARAM_SCALE_RANGE),
                "delay": float(rng.integers(1, self.max_delay + 1))}  # fmt: skip

    def dataset(self, bucket):
        return {}

    def make_consts(self, bucket, dyn, data, key):
        return {}

    def init_params(self, bucket, dyn, consts, key):
        return _init_rnn(key, self.vocab, bucket, dyn["param_scale"])

    def loss(self, bucket, dyn, data, consts, params, key):
        inputs = jax.random.randint(key, (bucket.batch, bucket.sequence), 0, self.vocab)
        delay = dyn["delay"].astype(jnp.int32)
        targets = jnp.roll(inputs, delay, axis=1)  # targets[:, t] = inputs[:, t - delay]
        logits = _rnn_logits(params, inputs, bucket, dyn["param_scale"])  # [seq, batch, vocab]
        scored = (jnp.arange(bucket.sequence) >= delay)[:, None]  # no target before the first delayed token
        return softmax_cross_entropy(logits, jnp.swapaxes(targets, 0, 1), weights=scored)
