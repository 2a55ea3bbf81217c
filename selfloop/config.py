"""Typed, validated configuration loaded from TOML.

Each TOML section is a frozen dataclass; every field carries its check. A bad
file fails before anything is written, with an error that names the file, the
key and what was expected.

The dataclass defaults are the one default configuration: the paper's loop
scaled to a 2-core machine, so the feedback loop (slow start, then
self-acceleration) shows within minutes. ``python run.py`` runs them as they
are; a config file (``configs/paper.toml``, ``configs/smoke.toml``, your own)
states only what it changes. Measurements behind the values are in
BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The families a user trains on and is evaluated on by default.
USER_FAMILIES = (
    "quadratic",
    "test2d",
    "linreg",
    "logreg",
    "teacher_student",
    "toy2d",
    "digits_mlp",
    "digits_ae",
    "char_rnn",
)
# Families a config may add to training; not in the defaults, so the default
# held-out set stays what BENCHMARKS.md measured.
EXTRA_FAMILIES = ("delayed_recall", "lowrank_ae")
# The outer problem's regime, mixed into training episodes by
# ``tasks.noisy_quadratic_share``; held-out sets and tournaments leave it out.
NOISY_QUADRATIC = "noisy_quadratic"
ALL_FAMILIES = USER_FAMILIES + EXTRA_FAMILIES + (NOISY_QUADRATIC,)
# Keys added after run directories and optimizer files were first written,
# with the value that a saved config without them meant.
ADDED_KEYS: dict[str, Any] = {
    "lopt.features": "per_tensor",
    "lopt.odd": False,
    "lopt.step_mult": 1e-3,
    "pbt.step_scale_factor": 1.0,
    "eval.unseen_families": (),
    "pbt.restore_confidence": 0.0,
    "pbt.champion_record": 0,
    "pbt.restore_truncation": True,
    "pbt.task_allocation": "uniform",
    "pbt.allocation_floor": 0.2,
    "tasks.noisy_quadratic_share": 0.0,
    "population.outer_step_mult": 1.0,
    "estimator.grad_weight": "unit",
    "population.fill_farm": False,
}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


Check = tuple[Callable[[Any], bool], str]


def _check(predicate: Callable[[Any], bool], expected: str, default: Any) -> Any:
    """A dataclass field whose loaded value must satisfy ``predicate``."""
    return field(default=default, metadata={"check": (predicate, expected)})


def positive(default):
    return _check(lambda v: math.isfinite(v) and v > 0, "a finite positive number", default)


def non_negative(default):
    return _check(lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0", default)


def non_empty(default):
    return _check(lambda v: bool(v.strip()), "a non-empty string", default)


def probability(default):
    return _check(lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]", default)


def one_of(choices: tuple[str, ...], default):
    return _check(lambda v: v in choices, f"one of {list(choices)}", default)


def positive_list(default):
    return _check(lambda v: len(v) > 0 and all(x > 0 for x in v), "a non-empty list of positive integers", default)


def subset_of(choices: tuple[str, ...], default):
    return _check(
        lambda v: len(v) > 0 and all(x in choices for x in v),
        f"a non-empty list drawn from {list(choices)}",
        default,
    )


@dataclass(frozen=True)
class RunConfig:
    name: str = non_empty("default")
    seed: int = 0
    # Minutes of training per session (0: no limit): a bounded first run;
    # raise it, or pass --max-minutes 0, to go on.
    max_minutes: float = non_negative(30.0)
    max_rounds: int = non_negative(0)  # 0: no round limit
    checkpoint_dir: str = non_empty("checkpoints/default")
    # "live": rich screen; "plain": a line per round and per event; "auto":
    # live on a terminal, plain otherwise (CI, nohup, pipes).
    dashboard: str = one_of(("auto", "live", "plain"), "auto")


@dataclass(frozen=True)
class PopulationConfig:
    size: int = _check(lambda v: v >= 2, "an integer >= 2 (PBT compares two members)", 10)  # the paper's
    # The paper's {200, 300, 400, 800} / 10: short unrolls keep a round near a second.
    truncations: tuple[int, ...] = positive_list((20, 30, 40, 80))
    # Persistent inner problems per member, one work unit each: the tasks in
    # a member's meta-batch, at least. A bigger meta-batch is not free where
    # every core is busy (more work per outer step, fewer steps per minute;
    # BENCHMARKS.md), so 2 is the least for a 2-core machine.
    tasks_per_member: int = positive(2)
    # Grow the meta-batch to fill the farm: a round runs its size x tasks
    # units in ceil(units / workers) waves, and the last wave leaves workers
    # idle that could estimate more tasks in the same time. With fill_farm,
    # tasks per member is the most that fits in the waves tasks_per_member
    # needs anyway (selfloop.master.population.meta_batch_tasks): 2 on up to
    # 14 workers, 3 on 16, 6 on 64. A run resumed on another farm is resized
    # to it. False: tasks_per_member on every farm.
    fill_farm: bool = True
    # Safety rail, not an update rule: an outer step longer than this fraction
    # of ‖θ‖ is shortened to it; 0 disables it. It is there for the outer
    # optimizer that proposes a step far too long (a lopt fed a meta-gradient
    # that is mostly noise can); the step's length is the lopt's to set.
    # 2.5 % rather than 2 %: the same loss at minute 30 on three paired seeds,
    # and the rail shortens under a tenth of the outer steps on all three
    # (BENCHMARKS.md); looser rails only let selection lengthen the steps.
    max_step_ratio: float = non_negative(0.025)
    # An outer optimizer's step is its lopt's step times this. The lopt's
    # step is sized by ``lopt.step_mult`` for inner problems, whose good
    # steps are an order of magnitude longer, relative to their weights, than
    # what a meta-gradient carrying little signal calls for: at 1 a rail
    # tight enough to keep the gains sets nearly every outer step's length,
    # and a trained lopt coasts on its momentum when the signal stops. At 0.2
    # the proposals start near the step lengths that worked under that rail,
    # so the rail can sit well above them as a safety net.
    outer_step_mult: float = positive(0.2)
    # An outer optimizer reads its step count through time features that it
    # only ever learned on inner problems of at most tasks.horizon_max steps.
    # Clamping the outer step count there keeps those features in distribution
    # for a run of any length (issue #8); false lets them run out of it.
    clamp_outer_time: bool = True


@dataclass(frozen=True)
class LOptConfig:
    # "mlp": the per-parameter MLP lopt; "hierarchical": the paper's per-tensor
    # LSTM feeding a per-parameter MLP (selfloop/lopt/hierarchical.py).
    arch: str = one_of(("mlp", "hierarchical"), "mlp")
    hidden: int = positive(32)  # per-parameter MLP width (both architectures)
    # The step is step_mult * d * exp(exp_mult * m) for MLP outputs d, m of
    # order one at random initialization. Steps as long as a good Adam's
    # (about 0.03 per weight on the training tasks) need d of about
    # 0.03 / step_mult, which the outer optimizers reach only by growing the
    # MLP's output weights that many times over, a few tenths of a percent of
    # ‖θ‖ per outer step: at 1e-3 (learned_optimization's value, and the
    # paper's architecture's) that growth is most of what self-training does.
    step_mult: float = positive(1e-2)
    lstm_hidden: int = positive(64)  # hierarchical only: the per-tensor LSTM's width
    # mlp only (selfloop/lopt/mlp.py): "per_tensor" normalizes g and every
    # momentum on its own; "relative" measures them against one running
    # gradient scale per tensor, so noise and a vanished gradient look small.
    # Per-tensor features rescale a decayed momentum to unit size, so an outer
    # optimizer can move a trained θ far with no gradient at all.
    # "adaptive": "relative" plus g and three momenta over each weight's own
    # running gradient RMS, so the MLP can size each weight's step by how
    # large that weight's gradients are, not only its tensor's; the default
    # since paired seeds learned faster with it on both axes (BENCHMARKS.md).
    # "scaled": "adaptive" plus log sizes of each tensor's weights and
    # gradients, the only channels that tell the MLP how large a task's
    # weights are, so it can learn a step size per task instead of one.
    features: str = one_of(("per_tensor", "relative", "adaptive", "scaled"), "adaptive")
    # mlp only: the step is an odd function of the gradient channels (no
    # gradient, no step; no learned step that ignores the gradient).
    odd: bool = True


@dataclass(frozen=True)
class EstimatorConfig:
    # "es" / "pes": antithetic perturbations of θ; "grad": backpropagation
    # through the truncation (selfloop/estimators.py). Two ES estimates of P
    # pairs can agree at best with cosine P/|θ|, the pair count over θ's
    # ~1,900 dimensions, whatever the tasks; a backpropagated gradient has
    # no such floor, and its estimates (each task's gradient at unit length)
    # agree far above it (BENCHMARKS.md). The default: it reaches a
    # stationary point of the training objective in minutes; held there by
    # the PBT settings below, three paired seeds ended their half hour lower
    # than with ES, on both the minutes and the inner-steps axes.
    kind: str = one_of(("es", "pes", "grad"), "grad")
    pairs: int = positive(4)  # ES/PES: antithetic pairs per unit, 2P unrolls under one vmap
    std: float = positive(0.01)
    chunk: int = positive(10)  # inner steps per compiled call; divides every truncation: one compiled length
    meta_loss_clip: float = positive(1.5)
    # Divide each task's antithetic differences L⁺ − L⁻ by their RMS over the
    # pairs, so every task of a meta-batch weighs alike and ĝ keeps one size
    # from step to step. How strongly a task's meta-loss reacts to θ differs
    # by orders of magnitude between families (and it changes as a slot's
    # task is replaced), so unscaled estimates jump in size with the tasks
    # drawn, and the outer optimizer, reading ĝ against its running scale,
    # takes those jumps for signal. (The held-out score also weighs every
    # task alike, after normalizing it by how far it can fall.) With ES it
    # leaves the step rail idle, but the outer steps it gives are twice as
    # long and the best member stalls higher (BENCHMARKS.md). ES and PES
    # only: "grad" always scales each task's gradient to unit length.
    standardize: bool = False
    # Shorten each work unit's estimate to at most this many times the median
    # length of the round's estimates (0: never). A task that reacts to θ far
    # more strongly than the others gives an estimate tens of times longer;
    # the outer optimizer reads it against a running scale with a memory of
    # about a thousand steps, so for as long as that task lasts it takes the
    # outlier for a strong, consistent signal and proposes steps the rail
    # must cut, and its momenta keep the spike after the task is gone. The
    # clip bounds such an estimate before it enters the outer optimizer's
    # state, and leaves every estimate within the factor as it is: tasks
    # still weigh by how strongly they react, unlike ``standardize``. It is
    # robust estimation of the meta-gradient, not an update rule: the step
    # is still the outer optimizer's. Off by default: at 4 it left the rail
    # nearly idle but learned more slowly on one of two seeds, and more
    # slowly still with the default's step length restored (BENCHMARKS.md):
    # the outliers carry much of what the loop learns from.
    outlier_clip: float = non_negative(0.0)
    # "grad" only: how a task's backpropagated gradient weighs in its member's
    # meta-batch. "unit": scaled to unit length, every segment alike. "meta_loss":
    # unit length times the segment's meta-loss (its mean clipped ℓ/ℓ_init),
    # so a segment weighs by how much loss its task still has to lose, as a
    # step weighs in the held-out score and as ES weighs it without
    # ``standardize``. "none": as backpropagated, so the meta-batch's mean is
    # the gradient of its mean meta-loss (near chaos a task's gradient can be
    # orders of magnitude longer than the rest: pair it with ``outlier_clip``).
    # "unit" stays the default: past the stationary point "meta_loss" drifted
    # up as "unit" did, and at that point the tasks' mean gradient points the
    # same way as backpropagated and at unit length (BENCHMARKS.md).
    grad_weight: str = one_of(("unit", "meta_loss", "none"), "unit")


@dataclass(frozen=True)
class TasksConfig:
    families: tuple[str, ...] = subset_of(ALL_FAMILIES, USER_FAMILIES)
    # Inner episodes of 200-2000 steps: 5-100 segments each (the paper's 1e3-1e4 / 5).
    horizon_min: int = positive(200)
    horizon_max: int = positive(2000)
    # Share of training episodes (the units that estimate meta-gradients) on
    # noisy_quadratic, whose gradients are mostly noise, on top of
    # ``families``. The same lopt is every member's outer optimizer, fed a
    # meta-gradient of that kind, and trained only on clean inner gradients
    # it sizes its outer steps for them (selfloop/tasks/synthetic.py). Off by
    # default: at 0.2 the proposed outer steps were no shorter (BENCHMARKS.md).
    noisy_quadratic_share: float = probability(0.0)

    @property
    def episode_families(self) -> tuple[str, ...]:
        """Every family a training episode may be drawn from."""
        extra = (NOISY_QUADRATIC,) if self.noisy_quadratic_share > 0 else ()
        return tuple(dict.fromkeys(self.families + extra))


@dataclass(frozen=True)
class PBTConfig:
    interval_rounds: int = non_negative(0)  # 0: by seconds only
    # The paper's ~3 h on 500K cores, scaled to 2 cores. Once backpropagated
    # meta-gradients have reached the training objective's stationary point,
    # selection is what keeps the population there, and a comparison on 16
    # tasks ranks members like the held-out set more often than one on 4:
    # 16 tasks every 12 s scores as many tasks per second as 4 every 3 s,
    # with fewer wrong copies (BENCHMARKS.md).
    interval_seconds: float = non_negative(12.0)
    tasks: int = positive(16)  # E, fresh training-distribution tasks per tournament
    # How those tasks are drawn. "uniform": from the training distribution.
    # "spread": families in proportion to how far apart contestants have been
    # scoring on them (Neyman allocation), each task's score weighted by
    # 1 / (families · its family's probability), so a comparison still
    # estimates the training distribution's mean. Late in a run optimizers
    # differ on a few families (where some diverge) and agree on the rest; on
    # E uniform tasks the rare divergences are mostly missed, and the member
    # that is faster on typical tasks wins while its mean is worse.
    task_allocation: str = one_of(("uniform", "spread"), "uniform")
    # Share of the draws kept uniform under "spread": every family is still
    # seen, and no task weighs more than 1 / allocation_floor.
    allocation_floor: float = _check(lambda v: 0.0 < v <= 1.0, "a number in (0, 1]", 0.2)
    # As long as the held-out evaluation's horizon: shorter tournaments crown
    # optimizers that start fast and lose by step 300, and the population
    # follows its champion.
    steps: int = positive(300)
    chunk: int = positive(50)
    p_outer_redraw: float = probability(0.5)
    p_truncation_redraw: float = probability(0.1)
    # PBT's explore step on the outer step scale (Jaderberg et al. 2017): after
    # every copy the loser's scale (in [0.001, 1], a factor on the outer step
    # once within the rail) is multiplied or divided by this factor, so
    # selection can shorten (anneal) the step each lineage takes where the
    # rail alone would fix it; the learned outer optimizer still sets its
    # direction and shape. 1: off.
    step_scale_factor: float = _check(lambda v: math.isfinite(v) and v >= 1.0, "a finite number >= 1 (1: off)",
                                      1.25)
    # Keep the best snapshot seen as a champion that competes in every
    # tournament and that losers copy when it beats the winner (selfloop/master/pbt.py).
    # Off by default: with backpropagated meta-gradients the members sit
    # within what a tournament can tell apart, challengers are crowned by
    # chance, and the champion scored worse on the held-out set than the
    # median member at most evaluations; paired seeds with and without it
    # differed in both directions (BENCHMARKS.md), and without it a
    # tournament's work all goes to the two members it compares.
    champion: bool = False
    # A winner that beats the champion on the tournament's tasks replaces it
    # only if it also wins on this many further fresh tasks (0: the tournament
    # alone decides): on a tournament's few tasks a lucky draw decides too often.
    champion_confirm_tasks: int = non_negative(8)
    # ... and only if its per-task advantage there is this many standard errors
    # above zero (a paired t statistic; 0: any advantage). Frequent
    # tournaments make many noisy comparisons; without a margin the champion
    # random-walks on their noise (the winner's curse).
    champion_confidence: float = non_negative(2.0)
    # A losing member copies the champion rather than the winner only if the
    # champion beat the winner by this many standard errors of its per-task
    # advantage on the tournament's tasks (0: any advantage). A champion that
    # has fallen behind the population can still win on a lucky draw; but
    # copies of the best snapshot are also much of PBT's selection pressure,
    # which is what improves a population whose meta-gradients carry little
    # signal, so the default asks no margin (BENCHMARKS.md).
    restore_confidence: float = non_negative(0.0)
    # Such a loser also takes the champion's truncation K (false: it keeps its
    # own, as when it copies the winner). Every copy of a long-K champion
    # lengthens the population's truncations, and a round lasts as long as
    # its units: a population drifted to K = 80 takes a third of the outer
    # steps per second of one at K = 20-40.
    restore_truncation: bool = True
    # The champion is retired (the tournament's winner crowned in its place)
    # once, over this many recent tournaments, its mean score is worse than
    # the mean of the pairs it met there (0: never). A challenge needs a clear
    # margin on a few tasks; an optimizer that is a little faster on most
    # tasks and diverges on a few wins such small samples, and as champion
    # would be copied for the rest of the run. Its tournament record is free:
    # the champion is scored on every tournament's tasks anyway. Off by
    # default: paired seeds did not learn faster with it (BENCHMARKS.md).
    champion_record: int = non_negative(0)


@dataclass(frozen=True)
class EvalConfig:
    # Held-out: ten instances per family. With two per family the set's own
    # instances decided close comparisons between optimizers.
    tasks: int = positive(90)
    steps: int = positive(300)
    chunk: int = positive(50)
    interval_rounds: int = non_negative(0)
    interval_seconds: float = non_negative(120.0)
    seed: int = 20210101  # fixed, so held-out sets agree across runs
    # Whole families left out of training (none of them may be in
    # tasks.families) and evaluated beside the in-family held-out set, as many
    # tasks per family as that set has: does the learned optimizer generalize
    # to problems of a kind it never trained on?
    unseen_families: tuple[str, ...] = _check(
        lambda v: all(x in ALL_FAMILIES for x in v), f"a list drawn from {list(ALL_FAMILIES)} (may be empty)", ()
    )


@dataclass(frozen=True)
class GuardConfig:
    # Roll a diverging member back to its best snapshot (selfloop/master/guard.py).
    rollback: bool = True
    smoothing: float = probability(0.1)  # EMA weight of the newest round's meta-loss
    # Diverged: smoothed meta-loss above 1 + margin, i.e. its inner problems end
    # worse than they started. Absolute, because a member's meta-loss also moves
    # with how hard its current tasks are (0.005 on some, 0.8 on others).
    margin: float = non_negative(0.05)
    min_gain: float = probability(0.5)  # act only once the best smoothed meta-loss is this far below 1.0


@dataclass(frozen=True)
class CheckpointConfig:
    # A checkpoint every this many seconds of run time and/or rounds (0: not by
    # that measure): the most work a crash of the master can cost.
    interval_seconds: float = non_negative(60.0)
    interval_rounds: int = non_negative(0)
    keep: int = positive(3)  # newest checkpoints kept; older ones are deleted


@dataclass(frozen=True)
class FarmConfig:
    # "local": worker processes pinned to this machine's cores; "dask": a Dask
    # scheduler's workers (several nodes); "inprocess": in the master (tests).
    engine: str = one_of(("local", "dask", "inprocess"), "local")
    workers: int = non_negative(0)  # local engine: 0 = one per available core
    scheduler: str = ""  # dask engine: tcp://HOST:8786
    connect_seconds: float = positive(20.0)  # dask engine: how long to try reaching the scheduler
    max_attempts: int = positive(3)  # a unit is tried this often before it is reported failed
    # Persistent JAX compilation cache, shared by every worker; on several nodes
    # put it on the shared filesystem at the same absolute path everywhere.
    compile_cache: str = "checkpoints/jax_cache"


@dataclass(frozen=True)
class Config:
    run: RunConfig = RunConfig()
    population: PopulationConfig = PopulationConfig()
    lopt: LOptConfig = LOptConfig()
    estimator: EstimatorConfig = EstimatorConfig()
    tasks: TasksConfig = TasksConfig()
    pbt: PBTConfig = PBTConfig()
    eval: EvalConfig = EvalConfig()
    farm: FarmConfig = FarmConfig()
    guard: GuardConfig = GuardConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def validate_consistency(self) -> None:
        """Checks that involve more than one key."""
        for k in self.population.truncations:
            if k % self.estimator.chunk:
                raise ConfigError(
                    f"population.truncations: {k} is not a multiple of estimator.chunk={self.estimator.chunk}"
                )
        if self.tasks.horizon_max < self.tasks.horizon_min:
            raise ConfigError("tasks.horizon_max: expected >= tasks.horizon_min")
        if self.checkpoint.interval_seconds == 0 and self.checkpoint.interval_rounds == 0:
            raise ConfigError("checkpoint.interval_seconds: both it and checkpoint.interval_rounds are 0 (never)")
        trained = sorted(set(self.eval.unseen_families) & set(self.tasks.families))
        if trained:
            raise ConfigError(f"eval.unseen_families: {trained} also in tasks.families; a held-out family must be "
                              "left out of training")
        if self.lopt.arch != "mlp" and (self.lopt.features != "per_tensor" or self.lopt.odd):
            raise ConfigError(f"lopt.features / lopt.odd: only the mlp architecture has them; with lopt.arch = "
                              f"{self.lopt.arch!r} also set lopt.features = 'per_tensor' and lopt.odd = false")
        if self.farm.engine == "dask" and not self.farm.scheduler:
            raise ConfigError("farm.scheduler: the dask engine needs an address such as tcp://HOST:8786")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list of {item_type.__name__}, got {value!r}")
        return tuple(_convert(v, item_type, where) for v in value)
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, str):
        return value
    if annotation is bool and isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")


def _build_section(cls: type, raw: dict[str, Any], section: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        where = f"{source}: {section}.{key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(fields))})")
        converted = _convert(value, hints[key], where)
        check: Check | None = fields[key].metadata.get("check")
        if check and not check[0](converted):
            raise ConfigError(f"{where}: expected {check[1]}, got {value!r}")
        values[key] = converted
    return cls(**values)


def config_from_dict(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a parsed TOML document into a ``Config``."""
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    built = {}
    for section, body in raw.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(sections)})")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        built[section] = _build_section(hints[section], body, section, source)
    config = Config(**built)
    try:
        config.validate_consistency()
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return config


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    dotted, literal = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {literal}")["v"]
    except tomllib.TOMLDecodeError:
        value = literal  # a bare word is a string
    return section, key, value


def with_overrides(raw: dict[str, Any], overrides: tuple[str, ...]) -> dict[str, Any]:
    """``raw`` with every ``section.key=value`` override applied (a new dict)."""
    raw = {section: dict(body) if isinstance(body, dict) else body for section, body in raw.items()}
    for text in overrides:
        section, key, value = _parse_override(text)
        raw.setdefault(section, {})[key] = value
    return raw


def load_config(path: str | Path | None, overrides: tuple[str, ...] = ()) -> Config:
    """The defaults, changed by a TOML config file (None: none) and then by
    ``section.key=value`` overrides; validated."""
    if path is None:
        return config_from_dict(with_overrides({}, overrides), "the default config")
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    return config_from_dict(with_overrides(raw, overrides), str(path))


def saved_config_from_dict(raw: dict[str, Any], source: str, overrides: tuple[str, ...] = ()) -> Config:
    """A config as a run directory or an optimizer file saved it (every key
    it had then), with ``overrides`` applied. Keys it predates take the value
    they had then (``ADDED_KEYS``), not today's default."""
    raw = with_overrides(raw, ())
    for dotted, value in ADDED_KEYS.items():
        section, key = dotted.split(".")
        if section in raw:
            raw[section].setdefault(key, list(value) if isinstance(value, tuple) else value)
    return config_from_dict(with_overrides(raw, overrides), source)


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (tuples as lists), the inverse of ``config_from_dict``."""
    return {
        section: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(body).items()}
        for section, body in ((f.name, getattr(config, f.name)) for f in dataclasses.fields(Config))
    }
