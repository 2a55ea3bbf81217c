"""Adam baselines (Kingma & Ba 2014), for evaluation only.

This is the one place selfloop imports optax for training a model: the
self-training path never imports this module.
"""

from __future__ import annotations

import numpy as np
import optax

from selfloop.evaluation import ADAM_LEARNING_RATES
from selfloop.unroll import InnerOptimizer

_scale_by_adam = optax.scale_by_adam()


def _adam_update(learning_rate, params, grads, state, loss=None):
    updates, state = _scale_by_adam.update(grads, state, params)
    params = optax.apply_updates(params, optax.scale(-learning_rate).update(updates, None)[0])
    return params, state


# ``hyper`` is the learning rate, so one compiled program runs the whole sweep.
ADAM = InnerOptimizer(init_state=_scale_by_adam.init, update=_adam_update)


def learning_rate_batch() -> np.ndarray:
    return np.asarray(ADAM_LEARNING_RATES, np.float32)
