"""Command line: ``python run.py [options]`` trains (the default command);
``python run.py eval`` evaluates a run against Adam; ``python run.py export``
writes one member as an optimizer file."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path

from selfloop.config import ALL_FAMILIES, Config, ConfigError, load_config
from selfloop.store.rundir import RunDir

# Command-line options that set a config key (every subcommand reads the ones it has).
OPTION_KEYS = (
    ("max_minutes", "run.max_minutes"), ("max_rounds", "run.max_rounds"), ("seed", "run.seed"),
    ("checkpoint_dir", "run.checkpoint_dir"), ("dashboard", "run.dashboard"), ("workers", "farm.workers"),
    ("compile_cache", "farm.compile_cache"), ("tasks", "eval.tasks"), ("steps", "eval.steps"),
)  # fmt: skip


def _parser(prog: str, description: str, checkpoint_dir_help: str) -> argparse.ArgumentParser:
    """A parser with the options every subcommand has: the config, overrides, the run directory."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="TOML file of changes to the default config (selfloop/config.py); without "
                        "it, a run that exists already keeps the config it was made with")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (TOML literal); repeatable",
    )
    parser.add_argument("--checkpoint-dir", help=f"{checkpoint_dir_help} (default: run.checkpoint_dir)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _parser("run.py", __doc__, "where events, caches and checkpoints go")
    parser.add_argument("--max-minutes", type=float, help="stop after this many minutes (default: run.max_minutes)")
    parser.add_argument("--max-rounds", type=int, help="stop after this many rounds (default: run.max_rounds)")
    parser.add_argument("--seed", type=int, help="run seed (default: run.seed)")
    parser.add_argument(
        "--dashboard",
        choices=("auto", "live", "plain"),
        help="live screen, plain lines, or auto: live on a terminal (default: run.dashboard)",
    )
    parser.add_argument("--fresh", action="store_true", help="start over in a directory that already holds a run")
    parser.add_argument("--workers", type=int, help="local worker processes, one pinned per core (0: all cores)")
    parser.add_argument("--scheduler", help="run units on a Dask scheduler, e.g. tcp://HOST:8786")
    parser.add_argument("--compile-cache", help="persistent JAX compilation cache directory (shared by workers)")
    return parser


def _overrides(args: argparse.Namespace) -> tuple[str, ...]:
    extra = list(args.set)
    if getattr(args, "scheduler", None):
        extra += ["farm.engine='dask'", f"farm.scheduler={args.scheduler!r}"]
    for option, key in OPTION_KEYS:
        value = getattr(args, option, None)
        if value is not None:
            extra.append(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    return tuple(extra)


def resolve_config(args: argparse.Namespace, fresh: bool = False) -> Config:
    """The config a command runs with: the defaults changed by ``--config``;
    without ``--config``, the config an existing run in the run directory was
    made with (unless ``fresh``). Then the flags and ``--set`` overrides."""
    overrides = _overrides(args)
    config = load_config(args.config, overrides)
    if args.config is None and not fresh:
        from selfloop.store.checkpoint import run_config

        return run_config(Path(config.run.checkpoint_dir), overrides) or config
    return config


def _set_aside(run_dir: Path, names: list[Path]) -> Path | None:
    """Move a previous run's files into ``run_dir/previous-<time>/``; nothing is deleted."""
    if not names:
        return None
    target = RunDir(run_dir).previous()
    target.mkdir()
    for path in names:
        shutil.move(path, target / path.name)
    return target


def _previous_run(run_dir: Path) -> list[Path]:
    from selfloop.store.checkpoint import list_checkpoints

    events = RunDir(run_dir).events
    return list_checkpoints(run_dir) + ([events] if events.exists() else [])


def build_export_parser() -> argparse.ArgumentParser:
    parser = _parser("run.py export", "write one member of a run as an optimizer file for load_optimizer", "the run")
    parser.add_argument(
        "--member", default="best",
        help="'best' (lowest latest held-out loss), 'champion' (PBT's best snapshot) or a member number",
    )  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, help="the optimizer file to write (.h5)")
    parser.add_argument("--round", type=int, help="export from the checkpoint of this round (default: the newest)")
    return parser


def export_main(argv: list[str]) -> int:
    args = build_export_parser().parse_args(argv)
    config = resolve_config(args)
    from selfloop.export import export_from_run

    member, state = export_from_run(Path(config.run.checkpoint_dir), config, args.member, args.out, args.round)
    if member == "champion":
        print(f"exported the PBT champion (from m{state.champion.source} at round {state.champion.round}) of "
              f"{config.run.checkpoint_dir} to {args.out}")
        return 0
    history = state.members[member].history
    scored = (f"held-out normalized loss {history[-1]:.3f} at the evaluation of round {state.last_eval_round}, "
              f"{state.round - state.last_eval_round} rounds of outer steps and PBT copies before these weights; "
              "`run.py eval --optimizer` measures them") if history else "not evaluated yet"
    print(f"exported member m{member} of {config.run.checkpoint_dir} at round {state.round} ({scored}) to {args.out}")
    return 0


def build_eval_parser() -> argparse.ArgumentParser:
    parser = _parser("run.py eval", "every member of a run's newest checkpoint against Adam on held-out tasks",
                     "the run")  # fmt: skip
    parser.add_argument("--tasks", type=int, help="E held-out tasks (default: eval.tasks)")
    parser.add_argument("--steps", type=int, help="T inner steps per task (default: eval.steps)")
    parser.add_argument("--workers", type=int, help="local worker processes (0: all cores)")
    parser.add_argument("--out", type=Path, help="output folder (default: <checkpoint-dir>/eval-r<round>-E<E>-T<T>)")
    parser.add_argument("--families", help="comma-separated task families to evaluate on (default: tasks.families); "
                        "families a run never trained on measure how it generalizes")
    parser.add_argument("--optimizer", type=Path, action="append",
                        help="evaluate this exported optimizer file instead of the checkpoint's members; repeatable")
    return parser


def _evaluated(args: argparse.Namespace, config, run_dir: Path) -> tuple[dict, object, str, str]:
    """What ``eval`` scores: (name -> θ, their lopt config, where they came from, a label)."""
    if args.optimizer:
        from selfloop.store.optimizer import load_theta

        loaded = {path.stem: load_theta(path) for path in args.optimizer}
        if len({lopt for lopt, _ in loaded.values()}) != 1:
            raise ConfigError("--optimizer: files of different architectures cannot be batched")
        thetas = {name: theta for name, (_, theta) in loaded.items()}
        return thetas, next(iter(loaded.values()))[0], ", ".join(loaded), "optimizers"
    from selfloop.store.checkpoint import load_latest

    found = load_latest(run_dir, config, lambda path, error: print(f"warning: skipping {error}", file=sys.stderr))
    if found is None:
        raise ConfigError(f"{run_dir}: no readable checkpoint to evaluate")
    state, path = found
    return {f"m{i}": m.theta for i, m in enumerate(state.members)}, config.lopt, str(path), f"r{state.round}"


def eval_main(argv: list[str]) -> int:
    args = build_eval_parser().parse_args(argv)
    config = resolve_config(args)
    from selfloop.farm.worker import configure_jax

    configure_jax(config.farm.compile_cache or None)
    from selfloop.evaluation.report import evaluate_lopts, format_family_table, format_table, write_outputs
    from selfloop.farm.engines import Interrupted, make_farm
    from selfloop.tasks.sampler import heldout_tasks

    run_dir, cfg = Path(config.run.checkpoint_dir), config.eval
    families = tuple(args.families.split(",")) if args.families else config.tasks.families
    if unknown := sorted(set(families) - set(ALL_FAMILIES)):
        raise ConfigError(f"--families: unknown {unknown} (known: {', '.join(ALL_FAMILIES)})")
    # A second held-out set (seed eval.seed + 1): the run's own evaluations, and with them
    # `export --member best`, chose among members on the first, so report on fresh instances.
    specs = heldout_tasks(cfg.tasks, families, cfg.seed + 1)
    thetas, lopt_config, source, label = _evaluated(args, config, run_dir)
    out = args.out or RunDir(run_dir).evaluation(label, cfg.tasks, cfg.steps)
    print(f"evaluating {len(thetas)} learned optimizers of {source} on {cfg.tasks} held-out tasks x {cfg.steps} "
          f"steps, with Adam at 15 rates on the same tasks (cached in {run_dir})", flush=True)
    farm = make_farm(config.farm, run_dir)
    stop = _stop_on_signals()
    farm.should_stop = lambda: stop.requested
    try:
        with _farm_progress(farm, "evaluating"):
            curves, table, families_table = evaluate_lopts(thetas, lopt_config, specs, cfg.steps, cfg.chunk,
                                                           farm.map, run_dir)  # fmt: skip
    except Interrupted:
        print(f"{stop.reason}: evaluation stopped; nothing written", file=sys.stderr)
        return 130
    finally:
        farm.close(now=stop.requested)
    title = f"{config.run.name}, {label}: {cfg.tasks} held-out tasks x {cfg.steps} steps"
    about = {"source": source, "label": label, "tasks": [s.describe() for s in specs],
             "task_families": [s.family for s in specs], "steps": cfg.steps, "title": title}
    files = write_outputs(out, curves, table, families_table, about)
    print(format_table(table))
    if len(families_table) > 1:
        print(format_family_table(families_table, list(thetas)))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _stop_on_signals():
    """A StopFlag that SIGINT and SIGTERM set (a second one exits at once)."""
    from selfloop.master.session import StopFlag

    stop = StopFlag()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda num, _frame: _request_stop(stop, num))
    return stop


@contextlib.contextmanager
def _farm_progress(farm, label: str):
    """Show the farm's progress through one command's long phase: a rich bar
    on a terminal, a line every few seconds otherwise."""
    from selfloop.farm.engines import reporting_progress
    from selfloop.master.session import PhaseProgress

    if not sys.stderr.isatty():
        with reporting_progress(farm, PhaseProgress(lambda text: print(f"...   {text}", file=sys.stderr,
                                                                       flush=True), label)):
            yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)
        with reporting_progress(farm, lambda done, total: bar.update(task, completed=done, total=total)):
            yield


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; bad input (a config key, a run directory, a
    member, an optimizer file, an unreachable farm) exits 2 with one line that
    names it."""
    from selfloop.farm.engines import FarmUnavailable
    from selfloop.store.checkpoint import CheckpointError
    from selfloop.store.optimizer import OptimizerFileError

    argv = sys.argv[1:] if argv is None else argv
    commands = {"export": export_main, "eval": eval_main}
    try:
        if argv[:1] and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return train_main(argv)
    except (ConfigError, CheckpointError, OptimizerFileError, FarmUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def train_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = resolve_config(args, fresh=args.fresh)  # fails before anything is written

    from selfloop.store.rundir import RunLock, RunLocked, usable_run_dir

    run_dir = usable_run_dir(Path(config.run.checkpoint_dir))
    try:
        lock = RunLock(run_dir).acquire()
    except RunLocked as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    try:
        return _train(args, config, run_dir)
    finally:
        lock.release()


def _found_and_notes(args: argparse.Namespace, config, run_dir: Path) -> tuple[object, list]:
    """The checkpoint to resume (None: a new population) and the events that say
    what was set aside or skipped on the way, logged once the session's log is open."""
    from selfloop import events
    from selfloop.farm.engines import usable_workers
    from selfloop.store.checkpoint import load_latest

    notes: list[events.Event] = []
    if args.fresh and (moved := _set_aside(run_dir, _previous_run(run_dir))):
        notes.append(events.Fresh(f"previous run moved to {moved}"))

    def skipped(path: Path, error: str) -> None:
        print(f"warning: skipping checkpoint {path}: {error}", file=sys.stderr)
        notes.append(events.CheckpointSkipped(path.name, error))

    found = load_latest(run_dir, config, skipped)
    if found is None and (moved := _set_aside(run_dir, _previous_run(run_dir))):
        # A run that died before its first checkpoint left only a log: nothing to resume.
        notes.append(events.Fresh(f"no usable checkpoint; previous files moved to {moved}"))
    if config.farm.engine == "local" and (capped := usable_workers(config.farm.workers)[1]):
        notes.append(events.Progress(f"farm.workers = {config.farm.workers}: {capped}"))
    return found, notes


def _train(args: argparse.Namespace, config, run_dir: Path) -> int:
    from selfloop.farm.worker import configure_jax

    configure_jax(config.farm.compile_cache or None)  # the master compiles outer steps

    from selfloop.farm.engines import Interrupted, make_farm
    from selfloop.master.session import Session
    from selfloop.master.trainer import Trainer
    from selfloop.observe.dashboard import LiveDashboard
    from selfloop.observe.plain import PlainReporter, format_event

    found, notes = _found_and_notes(args, config, run_dir)
    session = Session(config.run.max_minutes, _stop_on_signals())
    farm = make_farm(config.farm, run_dir)
    live = config.run.dashboard == "live" or (config.run.dashboard == "auto" and sys.stdout.isatty())
    reporter = LiveDashboard(in_flight=lambda: farm.stats.in_flight) if live else PlainReporter()
    interrupted = False
    try:
        with reporter if live else contextlib.nullcontext():
            trainer = Trainer(config, run_dir, reporter, farm, session)
            state = trainer.begin(found)
            for note in notes:
                trainer.log(note)
            try:
                trainer.prepare()
            except Interrupted:  # nothing trained yet: the checkpoint begin() found or wrote stands
                interrupted = True
                trainer.end(state, state.elapsed, f"{session.reason} while preparing")
            else:
                trainer.train(state, config.run.max_rounds)
        if live:  # the screen is gone: leave the outcome in the terminal
            last = trainer.log.last
            print(last and format_event(last) or "", f"\nevent log: {trainer.log.path}")
    finally:
        farm.close(now=interrupted or session.stop.requested)
    return 130 if session.stop.requested else 0


def _request_stop(stop, signum: int) -> None:
    name = signal.Signals(signum).name
    if stop.requested:
        # Checkpoints are written to a temporary file and renamed, and workers
        # die with the master: leaving now loses only the work since the last one.
        print(f"\n{name} again: exiting now; a resume continues from the last checkpoint", file=sys.stderr)
        os._exit(130)
    stop.request(name)
    print(f"\n{name}: stopping the running phase, then checkpointing (again to exit at once)", file=sys.stderr)
