"""h5py checkpoints of a whole run, written crash-safe, and the run-directory lock.

A checkpoint holds everything the master needs to continue, so the master may
be killed at any moment and restarted on any node that sees the directory:

  /                        attrs: format, round, elapsed_seconds, versions, the resolved config (JSON)
  /controller              attrs: PBT/eval/checkpoint timers and counters, the PBT RNG state (JSON)
  /members/NNN             attrs: outer_index, truncation, steps, ...
  /members/NNN/theta/...   one dataset per tensor of the member's lopt weights, named by its pytree path
  /members/NNN/outer_state/...   the outer optimizer's per-weight state for θ (momenta, step)
  /members/NNN/history     held-out scores so far
  /members/NNN/guard       attrs: smoothed meta-loss and its best; best_theta/, best_outer_state/
  /champion                the PBT champion (best snapshot seen): attrs, theta/, outer_state/
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

import contextlib
import fcntl
import json
import os
import re
import socket
import time
import zlib
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
from selfloop.guard import GuardState
from selfloop.lopt import make_lopt
from selfloop.pbt import Champion
from selfloop.population import Member, RunState, Slot, context_for
from selfloop.tasks.base import TaskSpec

FORMAT = "selfloop-checkpoint"
FORMAT_VERSION = 1
CHECKSUM = "crc32"  # dataset attribute: CRC-32 of the data's bytes
NAME = re.compile(r"^checkpoint-(\d{9})\.h5$")
# Settings that shape what a checkpoint holds; a resume may not change them.
FROZEN_KEYS = (
    "run.seed",
    "population.size",
    "population.tasks_per_member",
    "lopt.arch",
    "lopt.hidden",
    "lopt.lstm_hidden",
    "lopt.features",
    "lopt.odd",
    "lopt.step_mult",
    "estimator.kind",
    "estimator.pairs",
)
# Controller fields of RunState that are plain numbers (saved as attributes).
CONTROLLER_FIELDS = (
    "round",
    "pbt_events",
    "last_pbt_time",
    "last_pbt_round",
    "last_eval_time",
    "last_eval_round",
    "last_checkpoint_time",
    "last_checkpoint_round",
    "inner_steps",
    "elapsed",
    "first_best",
)
# Controller fields added later, with the value a checkpoint without them implies.
ADDED_CONTROLLER_FIELDS = {"heldout_set": ""}
CHAMPION_FIELDS = ("outer_index", "truncation", "steps", "source", "round")
MEMBER_FIELDS = ("outer_index", "truncation", "steps", "last_exploit_step", "meta_loss", "last_event",
                 "rejected_steps")
# Fields added later, with the value a checkpoint written before them implies.
ADDED_FIELDS = {"step_scale": 1.0}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the key."""


class RunLocked(RuntimeError):
    """Another live master holds the run directory."""


def versions() -> dict[str, str]:
    import jaxlib

    try:
        selfloop_version = metadata.version("selfloop")
    except metadata.PackageNotFoundError:
        selfloop_version = "unknown (not installed)"
    return {"selfloop": selfloop_version, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "numpy": np.__version__, "h5py": h5py.__version__}


# --- pytrees <-> groups of datasets ------------------------------------------------------------


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    raise TypeError(f"unsupported pytree key {key!r}")


def tree_paths(tree: Any) -> list[tuple[str, Any]]:
    """(dataset name, leaf) for every leaf: the pytree path joined by '/'."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [("/".join(_key_name(k) for k in path) or "value", leaf) for path, leaf in leaves]


def _crc32(data: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(data).tobytes())


def write_dataset(group: h5py.Group, name: str, data: Any) -> h5py.Dataset:
    """A dataset with the CRC-32 of its bytes, which every read verifies."""
    data = np.asarray(data)
    dataset = group.create_dataset(name, data=data)
    dataset.attrs[CHECKSUM] = _crc32(data)
    return dataset


def read_dataset(dataset: h5py.Dataset, where: str) -> np.ndarray:
    """The dataset's data; CheckpointError if it does not match its checksum
    (datasets written before checksums have none to check)."""
    data = dataset[()]
    if CHECKSUM in dataset.attrs and int(dataset.attrs[CHECKSUM]) != _crc32(data):
        raise CheckpointError(f"{where}: {dataset.name} does not match its checksum (the file is corrupt)")
    return data


def write_tree(group: h5py.Group, name: str, tree: Any, description: str) -> None:
    sub = group.create_group(name)
    sub.attrs["description"] = description
    for path, leaf in tree_paths(tree):
        write_dataset(sub, path, leaf)


def read_tree(group: h5py.Group, name: str, template: Any, where: str) -> Any:
    """Leaves of ``template``'s structure, read from ``group/name``; shapes and dtypes checked."""
    if name not in group:
        raise CheckpointError(f"{where}: missing group {group.name}/{name}")
    sub = group[name]
    leaves = []
    for path, expected in tree_paths(template):
        key = f"{sub.name}/{path}"
        if path not in sub:
            raise CheckpointError(f"{where}: missing dataset {key}")
        data = read_dataset(sub[path], where)
        if data.shape != tuple(expected.shape) or data.dtype != np.dtype(expected.dtype):
            raise CheckpointError(
                f"{where}: {key} holds {data.dtype}{list(data.shape)}, "
                f"expected {np.dtype(expected.dtype)}{list(expected.shape)}"
            )
        leaves.append(np.asarray(data))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)


# --- writing -----------------------------------------------------------------------------------


def checkpoint_path(run_dir: Path, round_index: int) -> Path:
    return run_dir / f"checkpoint-{round_index:09d}.h5"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files in ``run_dir``, newest (highest round) first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if NAME.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


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


def write_checkpoint(run_dir: Path, state: RunState, config: Config) -> Path:
    """Write ``state`` crash-safe as ``checkpoint-<round>.h5``; returns its path."""
    final = checkpoint_path(run_dir, state.round)
    temporary = run_dir / f".{final.name}.{os.getpid()}.tmp"
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
            except CheckpointError as error:
                problems.append(str(error))

    try:
        with h5py.File(path, "r", locking=False) as handle:
            if _scalar(handle.attrs.get("format", "")) != FORMAT:
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
    for stale in run_dir.glob(".checkpoint-*.tmp"):
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
        lopt = make_lopt(config.lopt)
        theta = jax.eval_shape(lopt.init_theta, jax.random.PRNGKey(0))
        return Templates(theta, jax.eval_shape(lopt.init_state, theta), config)

    def slot_state(self, spec: TaskSpec) -> Any:
        context = context_for(self.config)
        lopt = make_lopt(self.config.lopt)
        return jax.eval_shape(lambda th: new_slot(lopt, spec, th, self.config.estimator, context.horizon), self.theta)


def _scalar(value: Any) -> Any:
    """h5py attribute -> plain Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _added_fields(group: h5py.Group, fields: dict[str, Any] = ADDED_FIELDS) -> dict[str, Any]:
    """``fields`` (added later) as ``group`` holds them, or as a group from before them implies."""
    return {name: _scalar(group.attrs.get(name, default)) for name, default in fields.items()}


def _read_member(group: h5py.Group, templates: Templates, where: str) -> Member:
    attrs = {name: _scalar(group.attrs[name]) for name in MEMBER_FIELDS} | _added_fields(group)
    guard_group = group["guard"]
    guard = GuardState(ema=float(guard_group.attrs["ema"]), best_ema=float(guard_group.attrs["best_ema"]),
                       rollbacks=int(guard_group.attrs["rollbacks"]))
    if "best_theta" in guard_group:
        guard.best_theta = read_tree(guard_group, "best_theta", templates.theta, where)
        guard.best_outer_state = read_tree(guard_group, "best_outer_state", templates.outer_state, where)
    slots = []
    slot_groups = group["slots"]
    for s in range(templates.config.population.tasks_per_member):
        if str(s) not in slot_groups:
            raise CheckpointError(f"{where}: missing group {slot_groups.name}/{s}")
        sg = slot_groups[str(s)]
        names = [_scalar(n) for n in sg.attrs["dynamic_names"]]
        values = [float(v) for v in sg.attrs["dynamic_values"]]
        spec = TaskSpec(_scalar(sg.attrs["family"]), int(sg.attrs["bucket"]), int(sg.attrs["seed"]),
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
            raw = json.loads(_scalar(handle.attrs["config_json"]))
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


def usable_run_dir(run_dir: Path) -> Path:
    """``run_dir``, created if need be; ConfigError naming run.checkpoint_dir if
    it cannot hold a run (a file, not creatable, not writable)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.checkpoint_dir: {run_dir} is a file, not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"run.checkpoint_dir: cannot create {run_dir} ({error.strerror or error})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"run.checkpoint_dir: {run_dir} is not writable")
    return run_dir


def read_checkpoint(path: Path, config: Config) -> RunState:
    """The run state saved in ``path``, checked against ``config``."""
    where = str(path)
    try:
        with h5py.File(path, "r", locking=False) as handle:
            if _scalar(handle.attrs.get("format", "")) != FORMAT:
                raise CheckpointError(f"{where}: not a selfloop checkpoint (attribute 'format' is missing)")
            check_resumable(json.loads(_scalar(handle.attrs["config_json"])), config, where)
            controller = handle["controller"]
            values = {name: _scalar(controller.attrs[name]) for name in CONTROLLER_FIELDS}
            values |= _added_fields(controller, ADDED_CONTROLLER_FIELDS)
            rng = np.random.default_rng()
            rng.bit_generator.state = json.loads(_scalar(controller.attrs["pbt_rng_state_json"]))
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
                )
    except (OSError, KeyError) as error:
        raise CheckpointError(f"{where}: unreadable ({error})") from None
    return RunState(members=members, pbt_rng=rng, resumed_from=values["round"], champion=champion, **values)


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


# --- lock ----------------------------------------------------------------------------------------


class RunLock:
    """An exclusive ``flock`` on ``run_dir/lock`` for the master's lifetime.

    The kernel drops the lock when the process dies, however it dies, so a
    stale lock file never blocks a restart; the file records who holds it so a
    refused master can name the other process.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / "lock"
        self.handle = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held open until release)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            handle.close()
            raise RunLocked(f"{self.path.parent} is in use by another master: {holder}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
