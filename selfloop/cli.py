"""Command line: ``python run.py [options]`` trains (the default command)."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from selfloop.config import ConfigError, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py", description=__doc__)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML config (default: configs/default.toml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (TOML literal); repeatable",
    )
    parser.add_argument(
        "--checkpoint-dir", help="where events, caches and checkpoints go (default: run.checkpoint_dir)"
    )
    parser.add_argument("--max-minutes", type=float, help="stop after this many minutes (default: run.max_minutes)")
    parser.add_argument("--max-rounds", type=int, help="stop after this many rounds (default: run.max_rounds)")
    parser.add_argument("--seed", type=int, help="run seed (default: run.seed)")
    parser.add_argument("--dashboard", choices=("plain",), help="how progress is shown (default: run.dashboard)")
    parser.add_argument("--fresh", action="store_true", help="start over in a directory that already holds a run")
    parser.add_argument("--workers", type=int, help="local worker processes, one pinned per core (0: all cores)")
    parser.add_argument("--scheduler", help="run units on a Dask scheduler, e.g. tcp://HOST:8786")
    parser.add_argument("--compile-cache", help="persistent JAX compilation cache directory (shared by workers)")
    return parser


def _overrides(args: argparse.Namespace) -> tuple[str, ...]:
    extra = list(args.set)
    if args.scheduler:
        extra += ["farm.engine='dask'", f"farm.scheduler={args.scheduler!r}"]
    for option, key in (("max_minutes", "run.max_minutes"), ("max_rounds", "run.max_rounds"),
                        ("seed", "run.seed"), ("checkpoint_dir", "run.checkpoint_dir"),
                        ("dashboard", "run.dashboard"), ("workers", "farm.workers"),
                        ("compile_cache", "farm.compile_cache")):
        value = getattr(args, option)
        if value is not None:
            extra.append(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    return tuple(extra)


def _claim_run_dir(run_dir: Path, fresh: bool) -> None:
    events = run_dir / "events.jsonl"
    if not events.exists():
        return
    if not fresh:
        raise ConfigError(
            f"{run_dir} already holds a run ({events.name}); pass --fresh to start over "
            "(the old event log is kept under a timestamped name)"
        )
    shutil.move(events, run_dir / f"events-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, _overrides(args))
        run_dir = Path(config.run.checkpoint_dir)
        _claim_run_dir(run_dir, args.fresh)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from selfloop.worker import configure_jax

    configure_jax(config.farm.compile_cache or None)  # the master compiles outer steps

    from selfloop.farm import make_farm
    from selfloop.report import PlainReporter
    from selfloop.train import Trainer

    farm = make_farm(config.farm, run_dir)
    try:
        trainer = Trainer(config, run_dir, PlainReporter(), farm)
        trainer.prepare()
        trainer.train(trainer.new_state(), config.run.max_minutes, config.run.max_rounds)
    finally:
        farm.close()
    return 0
