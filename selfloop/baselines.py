"""Adam baselines (Kingma & Ba 2014), for evaluation only.

This is the one place selfloop imports optax for training a model: the
self-training path never imports this module.
"""

from __future__ import annotations

import numpy as np
import optax

from selfloop.unroll import InnerOptimizer

# The paper's sweep: 1e-6 to 1e1 every half decade, 15 rates.
ADAM_LEARNING_RATES = tuple(float(10.0 ** (k / 2)) for k in range(-12, 3))

_scale_by_adam = optax.scale_by_adam()


def _adam_update(learning_rate, params, grads, state, loss=None):
    updates, state = _scale_by_adam.update(grads, state, params)
    params = optax.apply_updates(params, optax.scale(-learning_rate).update(updates, None)[0])
    return params, state


# ``hyper`` is the learning rate, so one compiled program runs the whole sweep.
ADAM = InnerOptimizer(init_state=_scale_by_adam.init, update=_adam_update)


def learning_rate_batch() -> np.ndarray:
    return np.asarray(ADAM_LEARNING_RATES, np.float32)
