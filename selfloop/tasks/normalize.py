"""Loss normalization, so that tasks with wildly different loss scales average.

``normalize_curve`` is TaskSet's normalization (Metz et al. 2020),
used for every reported number: ℓ̃ = clip((ℓ − ℓ_best)/(ℓ_init − ℓ_best), 0, 1.5),
NaN/Inf -> 1.5, with ℓ_best the best loss any Adam learning rate reached.

``ratio_to_initial`` needs no baseline and is what self-training optimizes and
PBT compares: ℓ/ℓ_init clipped to [0, clip], non-finite -> clip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CLIP = 1.5


def normalize_curve(curve: np.ndarray, init_loss: float, best_loss: float, clip: float = CLIP) -> np.ndarray:
    """TaskSet-normalized learning curve (any shape; elementwise)."""
    curve = np.asarray(curve, dtype=np.float64)
    span = init_loss - best_loss
    span = span if span > 0 else 1e-12
    with np.errstate(invalid="ignore", over="ignore"):
        normalized = (curve - best_loss) / span
    normalized = np.where(np.isfinite(normalized), normalized, clip)
    return np.clip(normalized, 0.0, clip)


def ratio_to_initial(losses: np.ndarray, init_loss: np.ndarray, clip: float = CLIP) -> np.ndarray:
    """ℓ/ℓ_init clipped to [0, clip]; ``init_loss`` broadcasts against ``losses``."""
    losses = np.asarray(losses, dtype=np.float64)
    denominator = np.maximum(np.asarray(init_loss, dtype=np.float64), 1e-12)
    with np.errstate(invalid="ignore", over="ignore"):
        ratio = losses / denominator
    ratio = np.where(np.isfinite(ratio), ratio, clip)
    return np.clip(ratio, 0.0, clip)


def differentiable_ratio(losses: jax.Array, init_loss: jax.Array, clip: float = CLIP) -> jax.Array:
    """``ratio_to_initial`` in JAX, for backpropagating through an unroll: a
    non-finite loss gives the clip value and no gradient (masked before the
    division, so that no NaN reaches the gradient of the finite ones)."""
    finite = jnp.isfinite(losses)
    ratio = jnp.where(finite, losses, 0.0) / jnp.maximum(init_loss, 1e-12)
    return jnp.clip(jnp.where(finite, ratio, clip), 0.0, clip)
