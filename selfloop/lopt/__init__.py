"""Learned optimizers: pure ``init``/``update`` functions on pytrees."""

from __future__ import annotations

import functools
from typing import Any

import jax

from selfloop.lopt.base import LearnedOptimizer
from selfloop.lopt.hierarchical import HierarchicalConfig, make_hierarchical_lopt
from selfloop.lopt.mlp import MLPLOptConfig, make_mlp_lopt

# Architecture name (the config's ``lopt.arch``) -> factory from the lopt config.
LOPT_ARCHITECTURES = {
    "mlp": lambda cfg: make_mlp_lopt(MLPLOptConfig(hidden=cfg.hidden, step_mult=cfg.step_mult, features=cfg.features,
                                                   odd=cfg.odd)),
    "hierarchical": lambda cfg: make_hierarchical_lopt(
        HierarchicalConfig(lstm_hidden=cfg.lstm_hidden, mlp_hidden=cfg.hidden, step_mult=cfg.step_mult)
    ),
}


@functools.cache
def make_lopt(lopt_config) -> LearnedOptimizer:
    """The learned optimizer that ``lopt_config.arch`` names.

    Cached: one config gives the very same functions every time, which is what
    keys the compiled-program cache.
    """
    return LOPT_ARCHITECTURES[lopt_config.arch](lopt_config)


def shapes(lopt_config) -> tuple[Any, Any]:
    """(θ, the per-weight state it keeps for θ) as shapes and dtypes, computing nothing:
    what stored weights are checked against."""
    lopt = make_lopt(lopt_config)
    theta = jax.eval_shape(lopt.init_theta, jax.random.PRNGKey(0))
    return theta, jax.eval_shape(lopt.init_state, theta)


__all__ = ["LOPT_ARCHITECTURES", "LearnedOptimizer", "make_lopt", "shapes"]
