"""h5py checkpoints of a whole run, written crash-safe.

A checkpoint holds everything the master needs to continue, so the master may
be killed at any moment and restarted on any node that sees the directory:

  /                        attrs: format, round, elapsed_seconds, versions, the resolved config (JSON)
  /controller              attrs: PBT/eval/checkpoint timers and counters, the PBT RNG state (JSON)
  /members/NNN             attrs: outer_index, truncation, steps, ...
  /members/NNN/theta/...   one dataset per tensor of the member's lopt weights, named by its pytree path
  /members/NNN/outer_state/...   the outer optimizer's per-weight state for θ (momenta, step)
  /members/NNN/history     held-out scores so far
  /members/NNN/guard       attrs: smoothed meta-loss and its best; best_theta/, best_outer_state/
  /champion                the PBT champion (best snapshot seen): attrs, theta/, outer_state/, record
  /controller/family_spread_total, _weight   where tournaments draw tasks (pbt.task_allocation = "spread")
  /members/NNN/slots/S     attrs: the inner task (family, bucket, seed, settings);
                           state/...: the persistent inner problem exactly as the next unit gets it
                           (episode constants and counters, the ES/PES particles' weights and
                           lopt state, the PES perturbation accumulator)

Inner problems are saved whole, not as seeds: units are pure functions of
(run seed, round, member, slot, slot state), so restoring the slot states and
the PBT RNG makes a resumed run take the same steps as one never interrupted.

Writing: a temporary file in the same directory, flushed and fsynced, then
renamed over ``checkpoint-<round>.h5`` (atomic on POSIX) and the directory
fsynced; only the newest ``keep`` are kept. A crash at any moment therefore
leaves every earlier checkpoint intact and never a half-written one under a
checkpoint name. Reading checks every tensor's name, shape and dtype against
the structure the config implies, so a mismatch names the file and the key.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import h5py
import jax
import numpy as np

from selfloop.config import ADDED_KEYS, Config, ConfigError, config_to_dict, saved_config_from_dict
from selfloop.estimators import new_slot
from selfloop.lopt import make_lopt
from selfloop.lopt import shapes as lopt_shapes
from selfloop.master.population import context_for
from selfloop.state import Champion, FamilySpread, GuardState, Member, RunState, Slot, plain_fields
from selfloop.store.h5tree import StoredDataError, read_dataset, read_tree, scalar, write_dataset, write_tree
from selfloop.store.rundir import RunDir
from selfloop.tasks.base import TaskSpec

FORMAT = "selfloop-checkpoint"
FORMAT_VERSION = 1
# Settings that shape what a checkpoint holds; a resume may not change them.
FROZEN_KEYS = (
    "run.seed",
    "population.size",
    "lopt.arch",
    "lopt.hidden",
    "lopt.lstm_hidden",
    "lopt.features",
    "lopt.odd",
    "lopt.step_mult",
    "estimator.kind",
    "estimator.pairs",
)
# Fields added after checkpoints were first written, with the value a checkpoint
# without them implies: of the controller (RunState), and of members and the champion.
ADDED_CONTROLLER_FIELDS = {"heldout_set": ""}
ADDED_FIELDS = {"step_scale": 1.0}
# The plain numbers and strings of each state, saved as attributes; the rest
# (weights, slots, histories, the RNG) are saved as their own datasets.
CONTROLLER_FIELDS = plain_fields(RunState, exclude=("resumed_from", *ADDED_CONTROLLER_FIELDS))
MEMBER_FIELDS = plain_fields(Member, exclude=tuple(ADDED_FIELDS))
CHAMPION_FIELDS = plain_fields(Champion, exclude=tuple(ADDED_FIELDS))


class CheckpointError(StoredDataError):
    """A checkpoint that cannot be used; the message names the file and the key."""


def versions() -> dict[str, str]:
    import jaxlib

    try:
        selfloop_version = metadata.version("selfloop")
    except metadata.PackageNotFoundError:
        selfloop_version = "unknown (not installed)"
    return {"selfloop": selfloop_version, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "numpy": np.__version__, "h5py": h5py.__version__}


# --- writing -----------------------------------------------------------------------------------


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files in ``run_dir``, newest (highest round) first."""
    return RunDir(run_dir).checkpoints()


def _write_member(group: h5py.Group, member: Member) -> None:
    for name in MEMBER_FIELDS + tuple(ADDED_FIELDS):
        group.attrs[name] = getattr(member, name)
    write_tree(group, "theta", member.theta, "this member's learned-optimizer weights θ")
    write_tree(group, "outer_state", member.outer_state,
               "state kept by the outer optimizer (member outer_index's lopt) for θ: momenta and step count")
    write_dataset(group, "history", np.asarray(member.history, np.float64))
    group["history"].attrs["description"] = "held-out mean normalized loss at each evaluation so far"
    guard = group.create_group("guard")
    guard.attrs["description"] = "divergence guard: smoothed training meta-loss and the snapshot at its best"
    guard.attrs["ema"], guard.attrs["best_ema"], guard.attrs["rollbacks"] = (
        member.guard.ema, member.guard.best_ema, member.guard.rollbacks)
    if member.guard.best_theta is not None:
        write_tree(guard, "best_theta", member.guard.best_theta, "θ when best_ema was reached")
        write_tree(guard, "best_outer_state", member.guard.best_outer_state, "outer state at best_ema")
    slots = group.create_group("slots")
    slots.attrs["description"] = "persistent inner problems, each as the member's next work unit receives it"
    for s, slot in enumerate(member.slots):
        sg = slots.create_group(str(s))
        sg.attrs["family"], sg.attrs["bucket"], sg.attrs["seed"] = slot.spec.family, slot.spec.bucket, slot.spec.seed
        sg.attrs["dynamic_names"] = [k for k, _ in slot.spec.dynamic]
        sg.attrs["dynamic_values"] = np.asarray([v for _, v in slot.spec.dynamic], np.float64)
        write_tree(sg, "state", slot.state, "episode (constants, step, horizon, initial loss), particles, accumulator")


def _write_champion(group: h5py.Group, champion: Champion) -> None:
    group.attrs["description"] = "PBT champion: the best snapshot seen, judged head to head in tournaments"
    for name in CHAMPION_FIELDS + tuple(ADDED_FIELDS):
        group.attrs[name] = getattr(champion, name)
    write_tree(group, "theta", champion.theta, "the champion's learned-optimizer weights θ")
    write_tree(group, "outer_state", champion.outer_state, "its outer optimizer's state for θ")
    write_dataset(group, "record", np.asarray(champion.record, np.float64))
    group["record"].attrs["description"] = "per recent tournament: its mean score minus the pair's (> 0: worse)"


def write_checkpoint(run_dir: Path, state: RunState, config: Config) -> Path:
    """Write ``state`` crash-safe as ``checkpoint-<round>.h5``; returns its path."""
    final = RunDir(run_dir).checkpoint(state.round)
    temporary = RunDir(run_dir).checkpoint_being_written(state.round)
    # locking=False: HDF5's own file locks fail on NFS/Lustre; RunLock guards the directory.
    with h5py.File(temporary, "w", locking=False) as handle:
        handle.attrs["format"], handle.attrs["format_version"] = FORMAT, FORMAT_VERSION
        handle.attrs["description"] = (
            "A self-training population of learned optimizers (selfloop; Metz et al. 2021). "
            "Each group has a 'description' attribute."
        )
        handle.attrs["round"], handle.attrs["elapsed_seconds"] = state.round, state.elapsed
        handle.attrs["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        handle.attrs["config_json"] = json.dumps(config_to_dict(config))
        for name, value in versions().items():
            handle.attrs[f"version_{name}"] = value
        controller = handle.create_group("controller")
        controller.attrs["description"] = "round counter, timers (run-elapsed seconds) and the PBT RNG"
        for name in CONTROLLER_FIELDS + tuple(ADDED_CONTROLLER_FIELDS):
            controller.attrs[name] = getattr(state, name)
        controller.attrs["pbt_rng_state_json"] = json.dumps(state.pbt_rng.bit_generator.state)
        members = handle.create_group("members")
        members.attrs["description"] = "population members, numbered as in the event log"
        for i, member in enumerate(state.members):
            _write_member(members.create_group(f"{i:03d}"), member)
        if state.champion is not None:
            _write_champion(handle.create_group("champion"), state.champion)
        if state.family_spread is not None:
            for name in ("total", "weight"):
                write_dataset(controller, f"family_spread_{name}", getattr(state.family_spread, name))
            controller["family_spread_total"].attrs["description"] = (
                "per training family: running variance of contestants' tournament scores (times its weight)")
        handle.flush()
        os.fsync(handle.id.get_vfd_handle())
    os.replace(temporary, final)
    _fsync_dir(run_dir)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a good checkpoint (unreadable, not one, a dataset
    that fails its checksum), or None."""
    problems: list[str] = []

    def check(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset) and not problems:
            try:
                read_dataset(item, str(path))
            except StoredDataError as error:
                problems.append(str(error))

    try:
        with h5py.File(path, "r", locking=False) as handle:
            if scalar(handle.attrs.get("format", "")) != FORMAT:
                return f"{path}: not a selfloop checkpoint"
            handle.visititems(check)
    except (OSError, KeyError, ValueError) as error:
        return f"{path}: unreadable ({error})"
    return problems[0] if problems else None


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` good checkpoints (verified by their
    checksums); delete what is older than the oldest of them, and stale
    temporaries. A bad file never counts toward ``keep``, so the last good
    checkpoint is never deleted; a bad one newer than it stays until ``keep``
    good ones are newer (a resume skips it and says why)."""
    good = 0
    for path in list_checkpoints(run_dir):
        if good >= keep:
            path.unlink(missing_ok=True)
        elif checkpoint_problem(path) is None:
            good += 1
    for stale in RunDir(run_dir).stale_checkpoints_being_written():
        stale.unlink(missing_ok=True)


# --- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Templates:
    """Shapes and structures a config implies, to check a checkpoint against."""

    theta: Any
    outer_state: Any
    config: Config

    @staticmethod
    def of(config: Config) -> Templates:
        return Templates(*lopt_shapes(config.lopt), config)

    def slot_state(self, spec: TaskSpec) -> Any:
        context = context_for(self.config)
        lopt = make_lopt(self.config.lopt)
        return jax.eval_shape(lambda th: new_slot(lopt, spec, th, self.config.estimator, context.horizon), self.theta)


def _added_fields(group: h5py.Group, fields: dict[str, Any] = ADDED_FIELDS) -> dict[str, Any]:
    """``fields`` (added later) as ``group`` holds them, or as a group from before them implies."""
    return {name: scalar(group.attrs.get(name, default)) for name, default in fields.items()}


def _read_member(group: h5py.Group, templates: Templates, where: str) -> Member:
    attrs = {name: scalar(group.attrs[name]) for name in MEMBER_FIELDS} | _added_fields(group)
    guard_group = group["guard"]
    guard = GuardState(ema=float(guard_group.attrs["ema"]), best_ema=float(guard_group.attrs["best_ema"]),
                       rollbacks=int(guard_group.attrs["rollbacks"]))
    if "best_theta" in guard_group:
        guard.best_theta = read_tree(guard_group, "best_theta", templates.theta, where)
        guard.best_outer_state = read_tree(guard_group, "best_outer_state", templates.outer_state, where)
    slots = []
    slot_groups = group["slots"]
    # As many as were saved: the meta-batch follows the farm (population.fill_farm).
    for s in range(len(slot_groups)):
        if str(s) not in slot_groups:
            raise CheckpointError(f"{where}: missing group {slot_groups.name}/{s}")
        sg = slot_groups[str(s)]
        names = [scalar(n) for n in sg.attrs["dynamic_names"]]
        values = [float(v) for v in sg.attrs["dynamic_values"]]
        spec = TaskSpec(scalar(sg.attrs["family"]), int(sg.attrs["bucket"]), int(sg.attrs["seed"]),
                        tuple(zip(names, values)))
        slots.append(Slot(spec, read_tree(sg, "state", templates.slot_state(spec), where)))
    return Member(
        theta=read_tree(group, "theta", templates.theta, where),
        outer_state=read_tree(group, "outer_state", templates.outer_state, where),
        slots=slots,
        history=[float(x) for x in read_dataset(group["history"], where)],
        guard=guard,
        **attrs,
    )


def check_resumable(saved: dict, config: Config, where: str) -> None:
    """Refuse a config that changes what the checkpoint holds (ConfigError naming the key)."""
    current, defaults = config_to_dict(config), config_to_dict(Config())
    for dotted in FROZEN_KEYS:
        section, key = dotted.split(".")
        # A key the checkpoint predates had the value ADDED_KEYS gives it.
        then = ADDED_KEYS.get(dotted, defaults[section][key])
        before, after = saved.get(section, {}).get(key, then), current[section][key]
        if before != after:
            raise ConfigError(
                f"{dotted}: the run in {where} was made with {before!r}, this config says {after!r}; "
                "it shapes what the checkpoint holds, so it cannot change on resume (pass --fresh to start over)"
            )


def saved_config(path: Path, overrides: tuple[str, ...] = ()) -> Config:
    """The config a checkpoint's run was made with, ``overrides`` applied."""
    try:
        with h5py.File(path, "r", locking=False) as handle:
            raw = json.loads(scalar(handle.attrs["config_json"]))
    except (OSError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable ({error})") from None
    return saved_config_from_dict(raw, str(path), overrides)


def run_config(run_dir: Path, overrides: tuple[str, ...] = ()) -> Config | None:
    """The config the run in ``run_dir`` was made with (from its newest
    checkpoint that has a readable one), ``overrides`` applied; None if no
    checkpoint there has one."""
    for path in list_checkpoints(run_dir):
        try:
            return saved_config(path, overrides)
        except CheckpointError:
            continue
    return None


def read_checkpoint(path: Path, config: Config) -> RunState:
    """The run state saved in ``path``, checked against ``config``."""
    where = str(path)
    try:
        with h5py.File(path, "r", locking=False) as handle:
            if scalar(handle.attrs.get("format", "")) != FORMAT:
                raise CheckpointError(f"{where}: not a selfloop checkpoint (attribute 'format' is missing)")
            check_resumable(json.loads(scalar(handle.attrs["config_json"])), config, where)
            controller = handle["controller"]
            values = {name: scalar(controller.attrs[name]) for name in CONTROLLER_FIELDS}
            values |= _added_fields(controller, ADDED_CONTROLLER_FIELDS)
            rng = np.random.default_rng()
            rng.bit_generator.state = json.loads(scalar(controller.attrs["pbt_rng_state_json"]))
            templates = Templates.of(config)
            members_group = handle["members"]
            members = []
            for i in range(config.population.size):
                if f"{i:03d}" not in members_group:
                    raise CheckpointError(f"{where}: missing group /members/{i:03d}")
                members.append(_read_member(members_group[f"{i:03d}"], templates, where))
            champion = None
            if "champion" in handle:
                group = handle["champion"]
                champion = Champion(
                    theta=read_tree(group, "theta", templates.theta, where),
                    outer_state=read_tree(group, "outer_state", templates.outer_state, where),
                    **{name: int(group.attrs[name]) for name in CHAMPION_FIELDS}, **_added_fields(group),
                    record=tuple(float(x) for x in read_dataset(group["record"], where)) if "record" in group else (),
                )
            family_spread = None
            if "family_spread_total" in controller:
                family_spread = FamilySpread(*(np.asarray(read_dataset(controller[f"family_spread_{name}"], where),
                                                          np.float64) for name in ("total", "weight")))
    except (OSError, KeyError) as error:
        raise CheckpointError(f"{where}: unreadable ({error})") from None
    except StoredDataError as error:  # a tree's dataset missing, misshapen or corrupt
        raise CheckpointError(str(error)) from None
    return RunState(members=members, pbt_rng=rng, resumed_from=values["round"], champion=champion,
                    family_spread=family_spread, **values)


def load_latest(run_dir: Path, config: Config, on_skip: Callable[[Path, str], None]) -> tuple[RunState, Path] | None:
    """(state, path) from the newest readable checkpoint, or None if there is none.

    Unreadable newer files are reported through ``on_skip`` and passed over; a
    config that may not resume this run raises ``ConfigError``.
    """
    for path in list_checkpoints(run_dir):
        try:
            return read_checkpoint(path, config), path
        except CheckpointError as error:
            on_skip(path, str(error))
    return None
