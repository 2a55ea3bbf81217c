"""A self-trained learned optimizer as a standard optax optimizer.

``export_member`` writes one member's lopt weights θ (and the lopt settings
they need) to a small h5 file; ``load_optimizer`` turns such a file into an
``optax.GradientTransformation``, so anyone can train a JAX model with it:

    opt = selfloop.load_optimizer("selfloop/pretrained/default.h5")
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)   # params are required
    params = optax.apply_updates(params, updates)

Not on the self-training path: this module is the second (after baselines)
that imports optax.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfloop.checkpoint import CheckpointError, Templates, load_latest, read_tree, write_tree
from selfloop.config import Config, ConfigError, LOptConfig, config_to_dict, saved_config_from_dict
from selfloop.lopt import make_lopt
from selfloop.population import RunState

FORMAT = "selfloop-optimizer"
PRETRAINED = Path(__file__).resolve().parent / "pretrained"


class OptimizerFileError(ValueError):
    """An optimizer file that is missing or unreadable; the message names it."""


def choose_member(state: RunState, which: str) -> int:
    """``best``: the member with the lowest latest held-out score; or a member number."""
    if which == "champion":
        raise ConfigError("--member champion is not a member number (export_from_run handles it)")
    if which != "best":
        number = which.removeprefix("m")
        if not number.isdigit() or not 0 <= int(number) < len(state.members):
            raise ConfigError(f"--member: expected 'best', 'champion' or a member 0..{len(state.members) - 1} "
                              f"(m0..m{len(state.members) - 1}), got {which!r}")
        return int(number)
    scores = [m.history[-1] if m.history else math.inf for m in state.members]
    if not any(math.isfinite(s) for s in scores):
        raise ConfigError("--member best: no member has a held-out evaluation in this checkpoint yet")
    return min(range(len(scores)), key=scores.__getitem__)


def export_member(state: RunState, config: Config, member: int | str, out: Path, source: str) -> None:
    """Write member ``member``'s θ (or, for "champion", the PBT champion's) and lopt settings to ``out`` (h5)."""
    if member == "champion":
        if state.champion is None:
            raise ConfigError("--member champion: this checkpoint has no PBT champion (pbt.champion off, "
                              "or no tournament yet)")
        chosen = state.champion
        history = []
    else:
        chosen = state.members[member]
        history = chosen.history
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "w", locking=False) as handle:
        handle.attrs["format"] = FORMAT
        handle.attrs["description"] = (
            "A learned optimizer trained by selfloop's self-training population (Metz et al. 2021). "
            "Load with selfloop.load_optimizer(path) -> optax.GradientTransformation."
        )
        handle.attrs["lopt_json"] = json.dumps(config_to_dict(config)["lopt"])
        handle.attrs["source"], handle.attrs["member"], handle.attrs["round"] = source, member, state.round
        handle.attrs["heldout_history"] = np.asarray(history, np.float64)
        write_tree(handle, "theta", chosen.theta, "the learned optimizer's weights θ")


def export_from_run(run_dir: Path, config: Config, which: str, out: Path) -> tuple[int | str, RunState]:
    """Export from the newest readable checkpoint of ``run_dir``; returns (member, state)."""
    found = load_latest(run_dir, config, on_skip=lambda path, error: print(f"warning: skipping {error}"))
    if found is None:
        raise ConfigError(f"{run_dir}: no readable checkpoint to export from")
    state, path = found
    member = "champion" if which == "champion" else choose_member(state, which)
    export_member(state, config, member, out, source=str(path))
    return member, state


def load_theta(path: str | Path) -> tuple[LOptConfig, dict]:
    """(lopt settings, θ) stored by ``export_member``; ``OptimizerFileError``
    naming the file for one that is missing or not an optimizer file."""
    try:
        with h5py.File(path, "r", locking=False) as handle:
            if handle.attrs.get("format") != FORMAT:
                raise OptimizerFileError(f"{path}: not a selfloop optimizer file (attribute 'format' is not "
                                         f"{FORMAT!r})")
            lopt_config = saved_config_from_dict({"lopt": json.loads(handle.attrs["lopt_json"])}, str(path)).lopt
            template = Templates.of(Config(lopt=lopt_config)).theta
            return lopt_config, read_tree(handle, "theta", template, str(path))
    except FileNotFoundError:
        raise OptimizerFileError(f"{path}: no such optimizer file") from None
    except (OSError, KeyError, CheckpointError) as error:
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
