"""The divergence guard: a member made to diverge is rolled back, and only it."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from selfloop.config import GuardConfig
from selfloop.master.guard import GuardState, healthiest, observe
from selfloop.master.trainer import Trainer


def test_threshold_and_observe_exact():
    config = GuardConfig(smoothing=0.5, margin=0.05, min_gain=0.2)
    guard = GuardState()
    assert not observe(guard, 0.4, "theta-a", "state-a", config)  # first value: the EMA itself
    assert not observe(guard, 0.2, "theta-b", "state-b", config)  # EMA 0.3: new best, snapshot taken
    assert guard.best_ema == pytest.approx(0.3) and guard.best_theta == "theta-b"
    assert not observe(guard, 1.2, "theta-c", "state-c", config)  # EMA 0.75: harder tasks, not divergence
    assert observe(guard, 1.5, "theta-d", "state-d", config)  # EMA 1.125 > 1.05: diverged
    no_gains = GuardState(ema=0.9, best_ema=0.9)
    assert not observe(no_gains, 1.5, "theta", "state", config)  # nothing to keep: left to PBT
    assert guard.best_theta == "theta-b"
    assert healthiest([GuardState(ema=0.7), GuardState(ema=0.2), GuardState()]) == 1


def _guarded_run(smoke_config, tmp_path):
    """A smoke run 3 rounds in, guarding every member that gained at all (smoke members
    barely learn in 3 rounds), and its member with the best smoothed meta-loss."""
    config = dataclasses.replace(smoke_config, guard=GuardConfig(smoothing=0.5, margin=0.05, min_gain=0.0))
    records = []
    trainer = Trainer(config, tmp_path, report=records.append)
    state = trainer.new_state()
    for _ in range(3):
        trainer.run_round(state)
    victim = min(range(len(state.members)), key=lambda i: state.members[i].guard.best_ema)
    return config, records, trainer, state, victim


def test_diverged_member_is_rolled_back_without_spreading(smoke_config, tmp_path):
    _, records, trainer, state, victim = _guarded_run(smoke_config, tmp_path)
    assert state.members[victim].guard.best_ema < 1.0  # it has gains to keep
    # Make it an exploding optimizer: output bias (d, m) = (1e3, 1e4) gives inner
    # steps of 1e-3 * 1e3 * e^10 ~ 2e4; its inner problems diverge (meta-loss at the clip).
    theta = jax.tree_util.tree_map(np.array, state.members[victim].theta)
    theta["layer2"]["b"] = np.array([1e3, 1e4], np.float32)
    state.members[victim].theta = theta
    for _ in range(20):
        trainer.run_round(state)
        if any(r.kind == "rollback" and r.member == victim for r in records):
            break
    rollbacks = [r for r in records if r.kind == "rollback"]
    assert [r.member for r in rollbacks] == [victim]
    restored = state.members[victim]
    assert restored.guard.rollbacks == 1 and restored.outer_index != victim
    # Back to the θ the lopts had produced before the sabotage.
    assert np.abs(np.asarray(restored.theta["layer2"]["b"])).max() < 10
    for i, member in enumerate(state.members):
        if i != victim:  # the members it trained did not catch it
            assert np.abs(np.asarray(member.theta["layer2"]["b"])).max() < 10


def test_member_with_weights_scaled_by_1e6_is_rolled_back_and_its_trainees_stay_sound(smoke_config, tmp_path):
    """Issue #8: a member whose θ is scaled by 1e6 is detected and rolled back,
    and the member it trains meanwhile neither goes non-finite nor moves more
    than the step rail allows."""
    config, records, trainer, state, victim = _guarded_run(smoke_config, tmp_path)
    trainee = (victim + 1) % len(state.members)
    state.members[trainee].outer_index = victim  # the victim trains this member while it is broken
    before_theta = state.members[victim].theta
    state.members[victim].theta = jax.tree_util.tree_map(lambda x: np.asarray(x) * 1e6, before_theta)
    trainee_start = jax.tree_util.tree_map(np.array, state.members[trainee].theta)
    rounds = 0
    while not any(r.kind == "rollback" and r.member == victim for r in records):
        assert rounds < 20, "the diverged member was never rolled back"
        trainer.run_round(state)
        rounds += 1
    assert all(r.member == victim for r in records if r.kind == "rollback")
    restored = state.members[victim]
    assert max(np.abs(np.asarray(x)).max() for x in jax.tree_util.tree_leaves(restored.theta)) < 1e3
    moved = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - b, state.members[trainee].theta, trainee_start)
    norm = lambda tree: np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree_util.tree_leaves(tree)))  # noqa: E731
    assert np.isfinite(norm(state.members[trainee].theta))
    # Each round moves θ by at most max_step_ratio of its norm (compounded).
    assert norm(moved) <= ((1 + config.population.max_step_ratio) ** rounds - 1) * norm(trainee_start) * 1.001
