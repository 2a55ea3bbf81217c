"""Exporting a member of a run as an optimizer file (``python run.py export``).

The file format and ``load_optimizer`` live in ``selfloop.store.optimizer``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from selfloop.config import Config, ConfigError, config_to_dict
from selfloop.state import RunState
from selfloop.store.checkpoint import load_latest, read_checkpoint
from selfloop.store.optimizer import write_optimizer
from selfloop.store.rundir import RunDir


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
    provenance = {"source": source, "member": member, "round": state.round,
                  "heldout_history": np.asarray(history, np.float64)}
    write_optimizer(out, config_to_dict(config)["lopt"], chosen.theta, provenance)


def export_from_run(run_dir: Path, config: Config, which: str, out: Path,
                    round_index: int | None = None) -> tuple[int | str, RunState]:
    """Export from the newest readable checkpoint of ``run_dir``, or from the
    checkpoint of round ``round_index`` (a snapshot the run kept: see
    ``checkpoint.keep``); returns (member, state)."""
    if round_index is None:
        found = load_latest(run_dir, config, on_skip=lambda path, error: print(f"warning: skipping {error}"))
        if found is None:
            raise ConfigError(f"{run_dir}: no readable checkpoint to export from")
        state, path = found
    else:
        path = RunDir(run_dir).checkpoint(round_index)
        if not path.exists():
            kept = sorted(RunDir(run_dir).checkpoint_rounds())
            raise ConfigError(f"--round {round_index}: {path} does not exist; the rounds {run_dir} keeps "
                              f"checkpoints of: {kept or 'none'}")
        state = read_checkpoint(path, config)
    member = "champion" if which == "champion" else choose_member(state, which)
    export_member(state, config, member, out, source=str(path))
    return member, state
