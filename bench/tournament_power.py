"""Does a tournament pick the better optimizer? The champion's tail, and its record.

Scores every member and the PBT champion of a run's newest checkpoint on
``--tasks`` fresh training-distribution tasks with the tournament's score
(mean over ``pbt.steps`` of ℓ/ℓ_init), and takes their mean there as the
truth. Then, resampling those tasks, it prints how often the run's PBT rules
reach the verdict the truth gives, for the champion against the best member
and against the median member:

- ``tournament``: the member scores below the champion on E = ``pbt.tasks``
  tasks (the loser copies the champion otherwise);
- ``challenge``: the member also beats it on ``pbt.champion_confirm_tasks``
  further tasks by ``pbt.champion_confidence`` standard errors (it replaces
  the champion);
- ``record W``: over W tournaments against random pairs of members, the
  champion's mean score is worse than its pairs' (``pbt.champion_record``
  retires it).

It also prints the champion's per-task advantage by family: a champion that
is a little faster on most tasks and diverges on a few wins small samples;
and, for every pair of members the truth tells apart, how often a comparison
on E tasks gets their order right, with tasks drawn uniformly and with
``pbt.task_allocation = "spread"`` (its allocation learned from half of the
tasks, the draws made from the other half, and the two halves swapped).

    python bench/tournament_power.py checkpoints/default --tasks 90
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from ranking import spearman

from selfloop.events import Eval, of_type, read_events
from selfloop.farm.engines import LocalFarm
from selfloop.farm.worker import configure_jax
from selfloop.master.pbt import advantage_t, family_probabilities, observe_spread, task_scores, tournament_tasks
from selfloop.state import FamilySpread
from selfloop.store.checkpoint import list_checkpoints, read_checkpoint, saved_config

STREAM = 0x70E  # this bench's training tasks, disjoint from any run's tournaments


def heldout_at(run_dir: Path, state) -> np.ndarray | None:
    """The members' held-out scores if the run's last evaluation was at this
    checkpoint's round (None otherwise)."""
    evaluations = of_type(read_events(run_dir), Eval)
    if not evaluations or evaluations[-1].round != state.round:
        return None
    return np.array(evaluations[-1].members)


def scores_of(run_dir: Path, tasks: int, cache: str):
    """(config, names, [task, optimizer] scores, task families, the members'
    held-out scores or None) of the newest checkpoint."""
    path = list_checkpoints(run_dir)[0]
    config = saved_config(path)
    state = read_checkpoint(path, config)
    if state.champion is None:
        raise SystemExit(f"{path}: no champion to study")
    contestants = [SimpleNamespace(theta=m.theta) for m in state.members] + [state.champion]
    names = [f"m{i}" for i in range(len(state.members))] + ["champion"]
    specs = tournament_tasks(config, 0, tasks, STREAM)
    configure_jax(cache)
    farm = LocalFarm(cache_root=cache, log_dir=Path(tempfile.mkdtemp()))
    farm.wait_ready()
    try:
        per_task = task_scores(farm.map, config, contestants, specs)
    finally:
        farm.close()
    return config, names, per_task, np.array([s.family for s in specs]), heldout_at(run_dir, state)


def verdict_rates(per_task: np.ndarray, member: int, pbt, draws: int,
                  rng: np.random.Generator) -> tuple[float, float]:
    """How often a tournament, and a tournament and its challenge, find ``member``
    better than the champion (the last column)."""
    advantage = per_task[:, -1] - per_task[:, member]  # > 0: the member did better
    tournament = challenge = 0
    for _ in range(draws):
        if advantage[rng.integers(len(advantage), size=pbt.tasks)].mean() > 0:
            tournament += 1
            further = advantage[rng.integers(len(advantage), size=pbt.champion_confirm_tasks)]
            challenge += further.mean() > 0 and advantage_t(further) >= pbt.champion_confidence
    return tournament / draws, challenge / draws


def retire_rate(per_task: np.ndarray, window: int, tasks: int, draws: int, rng: np.random.Generator) -> float:
    """How often the champion's record over ``window`` tournaments of ``tasks``
    tasks against random pairs of members says it is worse than its pairs."""
    members = per_task.shape[1] - 1
    retired = 0
    for _ in range(draws):
        entries = []
        for _ in range(window):
            pair = rng.choice(members, size=2, replace=False)
            drawn = rng.integers(per_task.shape[0], size=tasks)
            entries.append(per_task[drawn, -1].mean() - per_task[np.ix_(drawn, pair)].mean())
        retired += np.mean(entries) > 0
    return retired / draws


def pair_order_rates(config, per_task: np.ndarray, families: np.ndarray, sizes: list[int], draws: int,
                     rng: np.random.Generator) -> dict[tuple[str, int], float]:
    """{(allocation, E): P(a comparison on E tasks orders a pair of members as the
    truth does)}, over the member pairs whose truth differs by 0.005 or more.

    The truth is the mean over families of each family's mean score (the
    training distribution draws families uniformly). Draws pick a family
    (uniformly, or by the "spread" allocation learned on the other half of
    the tasks) and then one of its tasks, weighted as the tournament weights it."""
    names = list(config.tasks.families)
    members = per_task[:, :-1]
    present = [f for f in names if (families == f).any()]
    truth = np.mean([members[families == f].mean(axis=0) for f in present], axis=0)
    pairs = [(i, j) for i in range(members.shape[1]) for j in range(i + 1, members.shape[1])
             if abs(truth[i] - truth[j]) >= 0.005]
    halves = [np.arange(len(families)) % 2 == h for h in (0, 1)]
    spread_config = dataclasses.replace(config, pbt=dataclasses.replace(config.pbt, task_allocation="spread"))
    rates = {}
    for allocation in ("uniform", "spread"):
        for size in sizes:
            correct = []
            for half, other in (halves, halves[::-1]):
                probabilities = np.array([1.0 / len(names) if f in present else 0.0 for f in names])
                if allocation == "spread":
                    spread = FamilySpread.unseen(len(names))
                    observe_spread(spread, config.tasks.families, [SimpleNamespace(family=f) for f in
                                                                    families[other]], members[other])
                    probabilities = family_probabilities(spread_config, spread)
                probabilities = probabilities * [f in present for f in names]
                probabilities /= probabilities.sum()
                pools = {f: np.flatnonzero(half & (families == f)) for f in present}
                drawn_families = rng.choice(len(names), size=(draws, size), p=probabilities)
                tasks = np.array([[rng.choice(pools[names[f]]) for f in row] for row in drawn_families])
                weights = 1.0 / (len(present) * probabilities[drawn_families])
                for i, j in pairs:
                    difference = (weights * (members[tasks, j] - members[tasks, i])).mean(axis=1)
                    correct.append(np.mean(np.sign(difference) == np.sign(truth[j] - truth[i])))
            rates[allocation, size] = float(np.mean(correct)) if correct else float("nan")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tasks", type=int, default=90, help="fresh training tasks: the truth")
    parser.add_argument("--windows", type=int, nargs="+", default=[10, 20, 40], help="record lengths, tournaments")
    parser.add_argument("--draws", type=int, default=4000, help="resamples per rate")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 12, 16], help="tasks per comparison, E")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "selfloop-bench-cache"))
    args = parser.parse_args()
    if not list_checkpoints(args.run_dir):
        raise SystemExit(f"{args.run_dir}: no checkpoint")
    config, names, per_task, families, heldout = scores_of(args.run_dir, args.tasks, args.cache)
    truth = per_task.mean(axis=0)
    print(f"{args.run_dir}: {args.tasks} training tasks × {config.pbt.steps} steps, mean ℓ/ℓ_init")
    print("  " + "  ".join(f"{n} {s:.3f}" for n, s in zip(names, truth)))
    order = np.argsort(truth[:-1])
    rng = np.random.default_rng(0)
    pbt = config.pbt
    for label, member in (("best member", order[0]), ("median member", order[len(order) // 2])):
        gap = truth[-1] - truth[member]
        tournament, challenge = verdict_rates(per_task, member, pbt, args.draws, rng)
        print(f"\nchampion against the {label} ({names[member]}): the truth says "
              f"{'the member' if gap > 0 else 'the champion'} is better by {abs(gap):.3f}")
        print(f"  P(a tournament of {pbt.tasks} tasks finds the member better)        {tournament:.2f}")
        print(f"  P(... and it wins a challenge of {pbt.champion_confirm_tasks} at t >= {pbt.champion_confidence:g})"
              f"           {challenge:.2f}")
    gap = truth[-1] - truth[:-1].mean()
    print(f"\nchampion against the members' mean: the truth says "
          f"{'the members are' if gap > 0 else 'the champion is'} better by {abs(gap):.3f}")
    for window in args.windows:
        rate = retire_rate(per_task, window, pbt.tasks, args.draws, rng)
        print(f"  P(a record of {window} tournaments against random pairs retires the champion)  {rate:.2f}")
    advantage = per_task[:, -1] - np.median(per_task[:, :-1], axis=1)
    print("\nthe champion's score minus the median member's, by family (> 0: the champion is worse)")
    print(f"  {'family':<16}{'mean':>8}{'median':>8}{'worst':>8}")
    for family in dict.fromkeys(families):
        values = advantage[families == family]
        print(f"  {family:<16}{values.mean():>+8.3f}{np.median(values):>+8.3f}{values.max():>+8.3f}")
    print(f"  {'all':<16}{advantage.mean():>+8.3f}{np.median(advantage):>+8.3f}{advantage.max():>+8.3f}")
    if heldout is not None:
        print("\nSpearman rank correlation of the members on the held-out set (its last evaluation) with")
        typical = np.median(per_task[:, :-1], axis=0)
        truth_rank = spearman(truth[:-1], heldout)
        print(f"  their mean score on the {args.tasks} training tasks (the truth)  {truth_rank:+.2f}")
        print(f"  their median per-task score there (a typical task)    {spearman(typical, heldout):+.2f}")
    rates = pair_order_rates(config, per_task, families, args.sizes, args.draws // 10, rng)
    print("\nP(a comparison on E tasks orders two members as the truth does), member pairs 0.005+ apart")
    print(f"  {'allocation':<12}" + "".join(f"{f'E = {e}':>9}" for e in args.sizes))
    for allocation in ("uniform", "spread"):
        print(f"  {allocation:<12}" + "".join(f"{rates[allocation, e]:>9.2f}" for e in args.sizes))


if __name__ == "__main__":
    main()
