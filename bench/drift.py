"""How fast self-training loses a good learned optimizer, side by side across configs.

The late drift of issue #8: a population that has learned keeps copying its
best snapshot back (PBT, the champion), yet its held-out loss creeps up
between copies. This measures that creep directly. Every member of a fresh
population becomes a copy of one snapshot from a run's latest checkpoint (the
PBT champion, θ and outer state; fresh inner problems), and the population
self-trains with no PBT for ``--seconds`` of rounds, scored on the held-out set
every ``--every`` seconds (evaluation time is not counted). Each ``--variant``
is a comma-separated list of ``--set`` overrides; every variant starts from
the same snapshot with the same seed, and variants run one after another on
the same farm size.

    python bench/drift.py checkpoints/confirm60 --variant "" \\
        --variant population.max_step_ratio=0.003 --variant population.tasks_per_member=4,estimator.pairs=2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from selfloop.config import load_config
from selfloop.farm.engines import LocalFarm
from selfloop.farm.worker import configure_jax
from selfloop.master.trainer import Trainer
from selfloop.store.checkpoint import list_checkpoints, read_checkpoint

REPO = Path(__file__).resolve().parent.parent


def snapshot(run_dir: Path, config):
    """The champion of ``run_dir``'s newest checkpoint."""
    paths = list_checkpoints(run_dir)
    if not paths:
        raise SystemExit(f"{run_dir}: no checkpoint-*.h5 to take a snapshot from")
    state = read_checkpoint(paths[0], config)
    if state.champion is None:
        raise SystemExit(f"{paths[0]}: has no PBT champion (pbt.champion off, or no tournament yet)")
    return state.champion, paths[0]


def drift(config, champion, run_dir: Path, seconds: float, every: float, cache: str, pbt: bool) -> dict:
    """Held-out scores of a population of copies of ``champion`` as it self-trains."""
    farm = LocalFarm(cache_root=cache, log_dir=run_dir / "workers")
    farm.wait_ready()
    try:
        trainer = Trainer(config, run_dir, report=lambda event: None, farm=farm)
        trainer.prepare()
        state = trainer.new_state()
        for member in state.members:
            member.theta, member.outer_state = champion.theta, champion.outer_state
        state.champion = champion
        scores, shortened, rejected = [], 0, 0
        training = 0.0
        scores.append((0.0, trainer.evaluate(state).members))
        while training < seconds:
            round_started = time.perf_counter()
            trainer.run_round(state)
            event = trainer.log.last  # the round's
            if pbt:
                trainer.run_if_due("pbt", state)
            training += time.perf_counter() - round_started
            shortened, rejected = shortened + event.shortened, rejected + event.rejected
            if training >= every * len(scores) or training >= seconds:
                scores.append((training, trainer.evaluate(state).members))
        rollbacks = sum(m.guard.rollbacks for m in state.members)
        return {"scores": scores, "rounds": state.round, "shortened": shortened, "rejected": rejected,
                "rollbacks": rollbacks, "tournaments": state.pbt_events}
    finally:
        farm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run's checkpoint directory (its champion is the snapshot)")
    parser.add_argument("--config", help="TOML changes to the default config (default: none)")
    parser.add_argument("--variant", action="append", default=None,
                        help='comma-separated --set overrides, e.g. "population.max_step_ratio=0.003"; "" = the config')
    parser.add_argument("--seconds", type=float, default=60.0, help="self-training time per variant")
    parser.add_argument("--every", type=float, default=20.0, help="seconds of training between held-out scores")
    parser.add_argument("--no-pbt", action="store_true",
                        help="rounds only: how fast outer steps alone lose the snapshot")
    args = parser.parse_args()
    variants = args.variant if args.variant is not None else [""]
    base = load_config(args.config, ())
    champion, path = snapshot(args.run_dir, base)
    cache = str(Path(tempfile.gettempdir()) / "selfloop-bench-cache")
    configure_jax(cache)
    print(f"snapshot: the champion of {path} (from member {champion.source}, round {champion.round}); "
          f"{args.seconds:.0f} s of self-training per variant, {'no PBT' if args.no_pbt else 'with PBT'}")
    rows = []
    for variant in variants:
        overrides = tuple(item for item in variant.split(",") if item)
        config = load_config(args.config, overrides)
        with tempfile.TemporaryDirectory() as tmp:
            # The run's Adam reference, so that no variant recomputes it.
            for reference in args.run_dir.glob("adam_reference_*.npz"):
                shutil.copy(reference, tmp)
            result = drift(config, champion, Path(tmp), args.seconds, args.every, cache, not args.no_pbt)
        rows.append((variant or "(config)", result))
        trail = "  ".join(f"{t:4.0f}s {np.median(s):.3f}/{np.min(s):.3f}" for t, s in result["scores"])
        print(f"  {variant or '(config)'}: held-out median/best  {trail}", flush=True)
    print(f"\n{'variant':<56}{'rounds':>7}{'tournaments':>12}{'shortened':>10}{'rejected':>9}{'rollbacks':>10}"
          f"{'median 0s':>10}{'median end':>11}{'best end':>9}")
    for name, result in rows:
        first, last = result["scores"][0][1], result["scores"][-1][1]
        steps = result["rounds"] * len(first)
        print(f"{name:<56}{result['rounds']:>7}{result['tournaments']:>12}{result['shortened'] / steps:>10.0%}"
              f"{result['rejected']:>9}"
              f"{result['rollbacks']:>10}{np.median(first):>10.3f}{np.median(last):>11.3f}{np.min(last):>9.3f}")


if __name__ == "__main__":
    main()
