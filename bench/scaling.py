"""Outer steps per second on the local farm with 1 worker and with more, side by side.

Runs the self-training rounds only (no PBT, no evaluation) of a config on
``LocalFarm`` pools of each size, in one process, after one pass that fills the
persistent compilation cache; every pool's workers trace all training
programs before timing (as ``run.py`` does at start), so the numbers are the
steady state of a long run. Pool sizes are measured in interleaved passes
(1, n, 1, n, ...) so drift shows in the ranges; parallel efficiency =
(rate_n / rate_1) / n, from the means.

    python bench/scaling.py                       # 1 worker and all cores
    python bench/scaling.py --workers 1 2 4 8 16 --set population.tasks_per_member=8
    python bench/scaling.py --queue-depth 1 2     # units each worker holds: 1 (no prefetch) against 2
    python bench/scaling.py --workers 2 16 --fill-farm   # each pool with the meta-batch it fills (fill_farm)

Every pool runs ``population.tasks_per_member`` units per member unless
``--fill-farm``, where each runs the meta-batch ``population.fill_farm`` gives
that many workers: outer steps/s then says what it costs in round time, and
tasks/s (meta-gradient estimates a second) what it buys.

Beside each pool, its workers each run the same rounds as a whole run by
themselves (own master, no farm), all at once: the throughput the machine
gives that many processes, so that the farm's own losses (dispatch, imbalance,
the master) show apart from the machine's (shared caches, memory bandwidth, a
vCPU that is not a whole core).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

from selfloop.config import load_config
from selfloop.farm.engines import QUEUE_DEPTH, LocalFarm
from selfloop.farm.units import warm_up
from selfloop.farm.worker import configure_jax
from selfloop.master.population import meta_batch_tasks
from selfloop.master.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


def timed_rounds(trainer: Trainer, rounds: int, warmup: int, tasks: int | None = None) -> float:
    """Seconds ``trainer`` takes for ``rounds`` rounds of a new run (``tasks``
    inner problems per member; default the config's), after ``warmup`` rounds."""
    state = trainer.new_state(tasks)
    for _ in range(warmup):
        trainer.run_round(state)
    start = time.perf_counter()
    for _ in range(rounds):
        trainer.run_round(state)
    return time.perf_counter() - start


def rounds_alone(config, rounds: int, warmup: int, tasks: int | None = None) -> float:
    """Seconds this process takes for ``rounds`` rounds of a whole run by
    itself (its own master, units in process), after ``warmup`` rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        return timed_rounds(Trainer(config, Path(tmp), report=lambda record: None), rounds, warmup, tasks)


def rounds_per_second(config, workers: int, rounds: int, warmup: int, cache: str, run_dir: Path,
                      queue_depth: int = QUEUE_DEPTH, tasks: int | None = None) -> tuple[float, float]:
    """Rounds per second through the farm, and the pool's ceiling: every worker
    running the same run by itself at once, with no farm (what the machine
    gives ``workers`` processes: ``workers`` x the rounds, in the time of the
    slowest)."""
    farm = LocalFarm(workers=workers, cache_root=cache, log_dir=run_dir / f"workers-{workers}",
                     queue_depth=queue_depth)
    farm.wait_ready()
    try:
        trainer = Trainer(config, run_dir, report=lambda record: None, farm=farm)
        farm.broadcast(functools.partial(warm_up, trainer.context, config.estimator.chunk))
        farm_rate = rounds / timed_rounds(trainer, rounds, warmup, tasks)
        alone = farm.broadcast(functools.partial(rounds_alone, config, rounds, warmup, tasks))
        return farm_rate, workers * rounds / max(alone)
    finally:
        farm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML changes to the default config (default: none)")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, len(os.sched_getaffinity(0))])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved passes over the pool sizes")
    parser.add_argument("--queue-depth", type=int, nargs="+", default=[QUEUE_DEPTH],
                        help="units each worker holds at once; several are measured side by side")
    parser.add_argument("--fill-farm", action="store_true",
                        help="each pool with the meta-batch population.fill_farm gives its workers")
    args = parser.parse_args()
    config = load_config(args.config, tuple(args.set))
    cache = str(Path(tempfile.gettempdir()) / "selfloop-bench-cache")
    configure_jax(cache)
    size = config.population.size
    tasks = {w: meta_batch_tasks(config.population, w) if args.fill_farm else config.population.tasks_per_member
             for w in args.workers}
    print(f"{os.cpu_count()} cpus, {len(os.sched_getaffinity(0))} usable; {size} members, tasks per member "
          + ", ".join(f"{t} at {w} workers" for w, t in tasks.items())
          + f"; {args.rounds} timed rounds after {args.warmup} warm-up rounds per pool")
    with tempfile.TemporaryDirectory() as tmp:
        # The rounds are deterministic: one pass over the whole sequence fills
        # the persistent cache with every program, so no timed pool compiles.
        for t in sorted(set(tasks.values())):
            rounds_per_second(config, 1, args.rounds, args.warmup, cache, Path(tmp), tasks=t)
        pools = [(w, d) for d in args.queue_depth for w in args.workers]
        rates: dict[tuple[int, int], list[float]] = {}
        alone: dict[tuple[int, int], list[float]] = {}
        for _ in range(args.repeats):
            for workers, depth in pools:
                rate, ceiling = rounds_per_second(config, workers, args.rounds, args.warmup, cache, Path(tmp), depth,
                                                  tasks[workers])
                rates.setdefault((workers, depth), []).append(rate * size)
                alone.setdefault((workers, depth), []).append(ceiling * size)
                print(f"  {workers:>3} workers, queue depth {depth}: {rate * size:8.2f} outer steps/s "
                      f"(workers alone: {ceiling * size:.2f})", flush=True)
    mean = {pool: sum(r) / len(r) for pool, r in rates.items()}
    mean_alone = {pool: sum(r) / len(r) for pool, r in alone.items()}
    base = args.workers[0]
    print("efficiency: of tasks/s, against the smallest pool at the same queue depth; alone: that many")
    print("independent whole runs at once, no farm (the machine's own ceiling); farm/alone: what the farm keeps of it")
    print("tasks/s: meta-gradient estimates a second (outer steps/s x tasks per member)")
    print(f"{'workers':>8}{'depth':>6}{'tasks':>6}{'steps/s':>10}{'range':>16}{'tasks/s':>9}{'speedup':>9}"
          f"{'efficiency':>12}{'alone':>9}{'alone eff':>11}{'farm/alone':>12}")
    for workers, depth in pools:
        runs = rates[workers, depth]
        spread = f"{min(runs):.2f}-{max(runs):.2f}"
        # Of work done (tasks/s), which is outer steps/s where every pool runs the same meta-batch.
        work = tasks[workers] / tasks[base]
        speedup = mean[workers, depth] / mean[base, depth] * base * work
        efficiency = speedup / workers
        alone_efficiency = mean_alone[workers, depth] / mean_alone[base, depth] * base / workers * work
        kept = mean[workers, depth] / mean_alone[workers, depth]
        print(f"{workers:>8}{depth:>6}{tasks[workers]:>6}{mean[workers, depth]:>10.2f}{spread:>16}"
              f"{mean[workers, depth] * tasks[workers]:>9.2f}{speedup:>9.2f}{efficiency:>12.2f}"
              f"{mean_alone[workers, depth]:>9.2f}{alone_efficiency:>11.2f}{kept:>12.2f}")

if __name__ == "__main__":
    main()
