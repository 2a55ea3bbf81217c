"""How long a checkpoint takes to write and read, and how big it is, per config.

Builds each config's population (every member's θ, outer state and persistent
inner problems, with guard snapshots filled in as in a running population),
then writes and reads it ``--repeats`` times, interleaved across configs.

    python bench/checkpoint.py [--configs default paper] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from selfloop.config import load_config
from selfloop.master.population import init_population
from selfloop.state import RunState
from selfloop.store.checkpoint import read_checkpoint, write_checkpoint

REPO = Path(__file__).resolve().parent.parent


def populated_state(config) -> RunState:
    members = init_population(config)
    for member in members:  # a running population carries guard snapshots too
        member.guard.best_theta, member.guard.best_outer_state = member.theta, member.outer_state
        member.guard.best_ema = member.guard.ema = 0.5
    return RunState(members=members)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", nargs="+", default=["default", "paper"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    configs = {name: load_config(REPO / "configs" / f"{name}.toml") for name in args.configs}
    states = {}
    for name, config in configs.items():
        started = time.perf_counter()
        states[name] = populated_state(config)
        print(f"{name}: population built in {time.perf_counter() - started:.1f}s", flush=True)
    writes = {name: [] for name in configs}
    reads = {name: [] for name in configs}
    sizes = {}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.repeats):
            for name, config in configs.items():
                run_dir = Path(root) / name
                run_dir.mkdir(exist_ok=True)
                started = time.perf_counter()
                path = write_checkpoint(run_dir, states[name], config)
                writes[name].append(time.perf_counter() - started)
                sizes[name] = path.stat().st_size
                started = time.perf_counter()
                read_checkpoint(path, config)
                reads[name].append(time.perf_counter() - started)
    print(f"\n{'config':10s} {'members x slots':>16s} {'size':>10s} {'write (median)':>15s} {'read (median)':>14s}")
    for name, config in configs.items():
        shape = f"{config.population.size} x {config.population.tasks_per_member}"
        print(f"{name:10s} {shape:>16s} {sizes[name] / 1e6:>8.2f}MB {statistics.median(writes[name]):>14.3f}s "
              f"{statistics.median(reads[name]):>13.3f}s")


if __name__ == "__main__":
    main()
