"""Optimizer files: one learned optimizer's weights θ and the lopt settings they need.

``write_optimizer`` stores them (``python run.py export`` does); ``load_optimizer``
turns such a file into an ``optax.GradientTransformation``, so anyone can
train a JAX model with it:

    opt = selfloop.load_optimizer("selfloop/pretrained/default.h5")
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)   # params are required
    params = optax.apply_updates(params, updates)

Reading one needs only the lopt and the h5 tree store: no population, PBT or
estimator module is imported. Not on the self-training path: this module is
the second (after baselines) that imports optax.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import jax
import jax.numpy as jnp
import optax

from selfloop.config import LOptConfig, saved_config_from_dict
from selfloop.lopt import make_lopt
from selfloop.lopt import shapes as lopt_shapes
from selfloop.store.h5tree import StoredDataError, read_tree, write_tree

FORMAT = "selfloop-optimizer"
PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"


class OptimizerFileError(ValueError):
    """An optimizer file that is missing or unreadable; the message names it."""


def write_optimizer(out: Path, lopt_settings: dict, theta: Any, provenance: dict[str, Any]) -> None:
    """Write θ, the lopt settings it needs (``config_to_dict(config)["lopt"]``) and
    ``provenance`` (attributes: where it came from) to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "w", locking=False) as handle:
        handle.attrs["format"] = FORMAT
        handle.attrs["description"] = (
            "A learned optimizer trained by selfloop's self-training population (Metz et al. 2021). "
            "Load with selfloop.load_optimizer(path) -> optax.GradientTransformation."
        )
        handle.attrs["lopt_json"] = json.dumps(lopt_settings)
        for name, value in provenance.items():
            handle.attrs[name] = value
        write_tree(handle, "theta", theta, "the learned optimizer's weights θ")


def load_theta(path: str | Path) -> tuple[LOptConfig, dict]:
    """(lopt settings, θ) stored by ``write_optimizer``; ``OptimizerFileError``
    naming the file for one that is missing or not an optimizer file."""
    try:
        with h5py.File(path, "r", locking=False) as handle:
            if handle.attrs.get("format") != FORMAT:
                raise OptimizerFileError(f"{path}: not a selfloop optimizer file (attribute 'format' is not "
                                         f"{FORMAT!r})")
            lopt_config = saved_config_from_dict({"lopt": json.loads(handle.attrs["lopt_json"])}, str(path)).lopt
            theta_shapes, _ = lopt_shapes(lopt_config)
            return lopt_config, read_tree(handle, "theta", theta_shapes, str(path))
    except FileNotFoundError:
        raise OptimizerFileError(f"{path}: no such optimizer file") from None
    except (OSError, KeyError, StoredDataError) as error:
        raise OptimizerFileError(f"{path}: unreadable optimizer file ({error})") from None


def load_optimizer(path: str | Path = PRETRAINED / "default.h5") -> optax.GradientTransformation:
    """The learned optimizer in ``path`` as an optax transformation (params required in ``update``)."""
    lopt_config, theta = load_theta(path)
    lopt = make_lopt(lopt_config)
    theta = jax.tree_util.tree_map(jnp.asarray, theta)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("a learned optimizer reads the weights: call update(grads, state, params)")
        new_params, state = lopt.update(theta, params, grads, state)
        return jax.tree_util.tree_map(jnp.subtract, new_params, params), state

    return optax.GradientTransformation(lopt.init_state, update)

