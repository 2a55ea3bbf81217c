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
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from selfloop.config import load_config  # noqa: E402
from selfloop.farm import LocalFarm  # noqa: E402
from selfloop.train import Trainer  # noqa: E402
from selfloop.work import warm_up  # noqa: E402
from selfloop.worker import configure_jax  # noqa: E402


def rounds_per_second(config, workers: int, rounds: int, warmup: int, cache: str, run_dir: Path) -> float:
    farm = LocalFarm(workers=workers, cache_root=cache, log_dir=run_dir / f"workers-{workers}")
    farm.wait_ready()
    try:
        trainer = Trainer(config, run_dir, report=lambda record: None, farm=farm)
        farm.broadcast(functools.partial(warm_up, trainer.context, config.estimator.chunk))
        state = trainer.new_state()
        for _ in range(warmup):
            trainer.run_round(state, 0.0)
        start = time.perf_counter()
        for _ in range(rounds):
            trainer.run_round(state, 0.0)
        return rounds / (time.perf_counter() - start)
    finally:
        farm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "default.toml"))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, len(os.sched_getaffinity(0))])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved passes over the pool sizes")
    args = parser.parse_args()
    config = load_config(args.config, tuple(args.set))
    cache = str(Path(tempfile.gettempdir()) / "selfloop-bench-cache")
    configure_jax(cache)
    size, units = config.population.size, config.population.size * config.population.tasks_per_member
    print(f"{os.cpu_count()} cpus, {len(os.sched_getaffinity(0))} usable; {size} members, {units} units per round, "
          f"{args.rounds} timed rounds after {args.warmup} warm-up rounds per pool")
    with tempfile.TemporaryDirectory() as tmp:
        # The rounds are deterministic: one pass over the whole sequence fills
        # the persistent cache with every program, so no timed pool compiles.
        rounds_per_second(config, 1, 0, args.warmup + args.rounds, cache, Path(tmp))
        rates: dict[int, list[float]] = {}
        for _ in range(args.repeats):
            for workers in args.workers:
                rate = rounds_per_second(config, workers, args.rounds, args.warmup, cache, Path(tmp))
                rates.setdefault(workers, []).append(rate * size)
                print(f"  {workers:>3} workers: {rate * size:8.2f} outer steps/s", flush=True)
    mean = {w: sum(r) / len(r) for w, r in rates.items()}
    print(f"{'workers':>8}{'steps/s':>10}{'range':>16}{'speedup':>9}{'efficiency':>12}")
    for workers in args.workers:
        spread = f"{min(rates[workers]):.2f}-{max(rates[workers]):.2f}"
        speedup = mean[workers] / mean[args.workers[0]] * args.workers[0]
        print(f"{workers:>8}{mean[workers]:>10.2f}{spread:>16}{speedup:>9.2f}{speedup / workers:>12.2f}")


if __name__ == "__main__":
    main()
