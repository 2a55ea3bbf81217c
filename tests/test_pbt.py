"""PBT tournaments: what is copied, how often mutations fire, who may be copied."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfloop.config import LOptConfig
from selfloop.farm.engines import InProcessFarm
from selfloop.master.pbt import (
    CONFIRM_STREAM,
    COPIED,
    Bout,
    advantage_t,
    crown,
    draw_tasks,
    exploit,
    explore,
    family_probabilities,
    is_stale,
    judge,
    keep_record,
    observe_spread,
    restore_champion,
    tournament,
    tournament_tasks,
)
from selfloop.master.population import init_population
from selfloop.state import FamilySpread


def test_exploit_copies_theta_outer_index_and_outer_state(smoke_config):
    members = init_population(smoke_config)
    members[0].outer_index, members[1].outer_index = 3, 2
    members[0].steps, members[0].step_scale = 17, 0.4
    loser_slots = members[1].slots
    exploit(members, winner=0, loser=1)
    for a, b in zip(jax.tree_util.tree_leaves(members[1].theta), jax.tree_util.tree_leaves(members[0].theta)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree_util.tree_leaves(members[1].outer_state), jax.tree_util.tree_leaves(members[0].outer_state)
    ):
        np.testing.assert_array_equal(a, b)
    assert members[1].outer_index == 3 and members[1].step_scale == 0.4
    assert members[1].slots is loser_slots  # inner problems stay the loser's own
    assert set(COPIED) == {"theta", "outer_index", "outer_state", "step_scale"}


def test_explore_multiplies_or_divides_the_step_scale(smoke_config):
    member = init_population(smoke_config)[0]
    rng = np.random.default_rng(5)
    scales = []
    for _ in range(400):
        explore(rng, member, 10, (20,), p_outer=0.0, p_truncation=0.0, step_scale_factor=1.25)
        scales.append(member.step_scale)
    moves = np.diff(np.log([1.0] + scales)) / np.log(1.25)
    inside = (np.array(scales[:-1]) > 1.25e-3) & (np.array(scales[:-1]) < 0.8)  # away from the clip
    assert set(np.round(moves[1:][inside]).astype(int)) == {-1, 1}
    assert 1e-3 <= min(scales) and max(scales) <= 1.0 and min(scales) < 0.1
    before = member.step_scale
    explore(rng, member, 10, (20,), p_outer=0.0, p_truncation=0.0)  # factor 1: off
    assert member.step_scale == before


def test_explore_probabilities(smoke_config):
    members = init_population(smoke_config)
    rng = np.random.default_rng(123)
    draws, outer_hits, k_hits, new_outer = 4000, 0, 0, []
    truncations = (200, 300, 400, 800)
    for _ in range(draws):
        outer, k = explore(rng, members[0], 10, truncations, p_outer=0.5, p_truncation=0.1)
        outer_hits += outer
        k_hits += k
        if outer:
            new_outer.append(members[0].outer_index)
        assert members[0].truncation in truncations or not k
    # Binomial(4000, p): 5 standard deviations either side.
    assert abs(outer_hits / draws - 0.5) < 5 * np.sqrt(0.25 / draws)
    assert abs(k_hits / draws - 0.1) < 5 * np.sqrt(0.09 / draws)
    counts = np.bincount(new_outer, minlength=10)
    assert counts.min() > 0.6 * len(new_outer) / 10  # uniform over the whole population


def test_tournament_loser_takes_winner(smoke_config):
    config = dataclasses.replace(
        smoke_config, pbt=dataclasses.replace(smoke_config.pbt, p_outer_redraw=0.0, p_truncation_redraw=0.0)
    )
    members = init_population(config)
    before = [m.theta for m in members]
    event, champion = tournament(members, InProcessFarm().map, config, np.random.default_rng(0), event_index=0,
                                 round_index=5)  # fmt: skip
    assert event is not None and event.winner != event.loser
    assert event.source == "winner" and event.champion_replaced and champion.source == event.winner
    assert event.winner_score <= event.loser_score
    for a, b in zip(
        jax.tree_util.tree_leaves(members[event.loser].theta), jax.tree_util.tree_leaves(before[event.winner])
    ):
        np.testing.assert_array_equal(a, b)
    assert not event.outer_redrawn and not event.truncation_redrawn


def test_non_finite_member_is_never_copied(smoke_config):
    members = init_population(smoke_config)
    members[2].theta = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), members[2].theta)
    rng = np.random.default_rng(1)
    champion = None
    for event_index in range(50):
        event, champion = tournament(members, InProcessFarm().map, smoke_config, rng, event_index, event_index,
                                     champion)  # fmt: skip
        for i, member in enumerate(members):
            if i != 2 or event is not None and event.loser == 2:
                assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(member.theta))
        if event is not None and 2 in (event.winner, event.loser):
            # It lost whatever the other scored, and was repaired by the copy.
            assert event.loser == 2 and np.isinf(event.loser_score)
            return
    raise AssertionError("member 2 was never drawn")


def _scaled(theta, factor):
    return jax.tree_util.tree_map(lambda x: np.asarray(x) * factor, theta)


def test_a_collapsed_pair_copies_the_champion_and_a_better_winner_replaces_it(smoke_config):
    # The per-tensor lopt, whose weights scaled by 1e6 take exploding steps. The
    # odd lopt's step flips with the gradient and its magnitude is an even
    # function, so scaled weights need not explode: they may scale steps to 0.
    # Any margin restores the champion here (two tasks rarely give a t statistic
    # of 2); the margin is tested below.
    pbt = dataclasses.replace(smoke_config.pbt, p_outer_redraw=0.0, p_truncation_redraw=0.0, restore_confidence=0.0)
    config = dataclasses.replace(smoke_config, pbt=pbt, lopt=LOptConfig(features="per_tensor", odd=False))
    members = init_population(config)
    champion = crown(members[0], 0, round_index=3)
    for member in members:  # every member collapses: exploding steps on every task
        member.theta = _scaled(member.theta, 1e6)
    event, after = tournament(members, InProcessFarm().map, config, np.random.default_rng(0), 0, 10, champion)
    assert event.source == "champion" and event.champion_score < event.winner_score
    assert after is champion and not event.champion_replaced
    for a, b in zip(jax.tree_util.tree_leaves(members[event.loser].theta), jax.tree_util.tree_leaves(champion.theta)):
        np.testing.assert_array_equal(a, b)
    assert members[event.loser].outer_index == champion.outer_index

    # A champion that itself explodes loses to any sound winner and is replaced by it.
    sound = init_population(config)
    bad = crown(sound[1], 1, round_index=3)
    bad = dataclasses.replace(bad, theta=_scaled(bad.theta, 1e6))
    event, after = tournament(sound, InProcessFarm().map, config, np.random.default_rng(0), 0, 10, bad)
    assert event.source == "winner" and event.champion_replaced and after.source == event.winner
    for a, b in zip(jax.tree_util.tree_leaves(after.theta), jax.tree_util.tree_leaves(sound[event.winner].theta)):
        np.testing.assert_array_equal(a, b)


def test_a_restore_takes_the_champions_truncation_only_when_asked(smoke_config):
    members = init_population(smoke_config)
    members[0].truncation, members[1].truncation = 80, 20
    champion = crown(members[0], 0, round_index=3)
    restore_champion(members, champion, 1, with_truncation=False)
    assert members[1].truncation == 20 and members[1].outer_index == champion.outer_index
    for a, b in zip(jax.tree_util.tree_leaves(members[1].theta), jax.tree_util.tree_leaves(champion.theta)):
        np.testing.assert_array_equal(a, b)
    restore_champion(members, champion, 1)
    assert members[1].truncation == 80


def test_without_the_champion_setting_no_champion_is_kept(smoke_config):
    config = dataclasses.replace(smoke_config, pbt=dataclasses.replace(smoke_config.pbt, champion=False))
    members = init_population(config)
    event, champion = tournament(members, InProcessFarm().map, config, np.random.default_rng(0), 0, 1)
    assert champion is None and not event.champion_replaced and event.source == "winner"


def _close_challenges(config, seed: int, count: int = 40):
    """Tournaments among fresh near-copies (±5 % per weight) of the champion,
    so that challenges are close and go either way; yields (champion before,
    event, champion after)."""
    members = init_population(config)
    champion = crown(members[0], 0, round_index=0)
    rng = np.random.default_rng(seed)
    for event_index in range(count):
        for member in members:
            member.theta = jax.tree_util.tree_map(lambda x: x * (1 + 0.05 * rng.standard_normal(x.shape)),
                                                  champion.theta)  # fmt: skip
        before = champion
        event, champion = tournament(members, InProcessFarm().map, config, np.random.default_rng(event_index),
                                     event_index, event_index, champion)  # fmt: skip
        yield before, event, champion


def test_a_challenger_replaces_the_champion_only_if_it_also_wins_the_confirmation(smoke_config):
    # Any margin on the further tasks suffices here; the margin is tested below.
    pbt = dataclasses.replace(smoke_config.pbt, p_outer_redraw=0.0, p_truncation_redraw=0.0, champion_confidence=0.0)
    config = dataclasses.replace(smoke_config, pbt=pbt)
    assert config.pbt.champion_confirm_tasks > 0  # on by default
    confirm_specs = tournament_tasks(config, 0, config.pbt.champion_confirm_tasks, CONFIRM_STREAM)
    assert len(confirm_specs) == config.pbt.champion_confirm_tasks
    assert confirm_specs[0] != tournament_tasks(config, 0)[0]  # a draw of its own
    verdicts = set()
    for before, event, champion in _close_challenges(config, seed=0):
        challenged = event.winner_score < event.champion_score
        assert challenged == np.isfinite(event.confirm_winner_score)
        if not challenged:
            assert champion is before and not event.champion_replaced
            continue
        won = event.confirm_winner_score < event.confirm_champion_score
        assert np.isfinite(event.confirm_t) and (event.confirm_t > 0) == won
        assert event.champion_replaced == won and (champion is not before) == won
        verdicts.add(won)
        if verdicts == {True, False}:
            return
    raise AssertionError(f"40 tournaments gave only these challenge outcomes: {verdicts}")


def test_the_champion_falls_only_to_an_advantage_larger_than_its_noise():
    steady = np.full(8, 0.01)  # 1 % better on every task
    noisy = np.array([0.2, -0.15, 0.1, -0.12, 0.05, -0.02, 0.03, -0.01])  # better on average, by luck
    assert advantage_t(steady) == np.inf and advantage_t(-steady) == -np.inf
    assert advantage_t(np.array([np.inf, 0.01])) == np.inf  # a non-finite opponent loses
    assert 0 < advantage_t(noisy) < 1
    assert advantage_t(steady + 0.01 * np.arange(8)) > 2  # consistent, if uneven: well above its error
    assert np.isclose(advantage_t(noisy), noisy.mean() / (noisy.std(ddof=1) / np.sqrt(8)))


def test_a_challenger_that_wins_by_less_than_the_confidence_keeps_the_champion(smoke_config):
    pbt = dataclasses.replace(smoke_config.pbt, p_outer_redraw=0.0, p_truncation_redraw=0.0, champion_confidence=50.0)
    config = dataclasses.replace(smoke_config, pbt=pbt)
    narrow_wins = 0
    for before, event, champion in _close_challenges(config, seed=1):
        assert champion is before and not event.champion_replaced
        narrow_wins += bool(event.confirm_winner_score < event.confirm_champion_score)
        if narrow_wins >= 2:
            return
    raise AssertionError(f"only {narrow_wins} challengers won on the further tasks: nothing was tested")


def test_the_loser_copies_the_champion_only_when_it_beat_the_winner_by_the_confidence(smoke_config):
    # Near-copies of the champion: it beats the winner on some tournaments'
    # tasks by chance, never by fifty standard errors.
    pbt = dataclasses.replace(smoke_config.pbt, p_outer_redraw=0.0, p_truncation_redraw=0.0, restore_confidence=50.0)
    config = dataclasses.replace(smoke_config, pbt=pbt)
    chance_wins = 0
    for _before, event, _champion in _close_challenges(config, seed=2):
        assert np.isfinite(event.restore_t)
        assert event.source == ("champion" if event.restore_t >= 50.0 else "winner")
        chance_wins += bool(event.champion_score < event.winner_score)
        if chance_wins >= 2:
            return
    raise AssertionError(f"the champion beat the winner only {chance_wins} times: nothing was tested")


def test_the_champion_record_is_its_mean_score_minus_the_pairs_over_recent_tournaments(smoke_config):
    champion = crown(init_population(smoke_config)[0], 0, round_index=0)
    bout = judge(np.array([[0.2, 0.4, 0.5], [0.4, 0.6, 0.3]]), 0, 1)  # [task, (a, b, champion)]
    once = keep_record(champion, bout, window=3)
    assert once.record == (pytest.approx(0.4 - 0.4),) and champion.record == ()
    worse = judge(np.array([[0.2, 0.2, 0.9], [0.2, 0.2, 0.9]]), 0, 1)
    full = keep_record(keep_record(keep_record(once, worse, 3), worse, 3), worse, 3)
    assert full.record == pytest.approx((0.7, 0.7, 0.7))  # only the newest 3 kept
    one_diverged = judge(np.array([[0.2, np.inf, 0.5], [0.4, np.inf, 0.3]]), 0, 1)  # the finite member alone
    assert keep_record(champion, one_diverged, 3).record == (pytest.approx(0.1),)
    assert keep_record(champion, Bout(0, 1, np.inf, np.inf, 0.4), 3) is champion  # no finite pair
    assert keep_record(champion, worse, 0) is champion  # off
    assert not is_stale(keep_record(once, worse, 3), 3)  # two tournaments: too few to judge
    assert is_stale(full, 3) and not is_stale(full, 0) and not is_stale(None, 3)
    better = dataclasses.replace(full, record=(0.7, -0.5, -0.5))
    assert not is_stale(better, 3)


def test_a_champion_with_a_worse_record_is_retired_even_when_it_wins_the_tournament(smoke_config):
    # The collapsed pair of the test above: the champion beats the winner here,
    # but its record says it lost to its pairs before; the winner is crowned
    # and the loser copies the winner, not the retired champion.
    pbt = dataclasses.replace(smoke_config.pbt, p_outer_redraw=0.0, p_truncation_redraw=0.0, champion_record=3)
    config = dataclasses.replace(smoke_config, pbt=pbt, lopt=LOptConfig(features="per_tensor", odd=False))
    members = init_population(config)
    stale = dataclasses.replace(crown(members[0], 0, round_index=3), record=(2.0, 2.0))
    for member in members:
        member.theta = _scaled(member.theta, 1e6)
    event, after = tournament(members, InProcessFarm().map, config, np.random.default_rng(0), 0, 10, stale)
    assert event.champion_score < event.winner_score  # it won this one
    assert event.champion_retired and event.champion_replaced and event.source == "winner"
    assert event.champion_record == pytest.approx(np.mean((2.0, 2.0, event.champion_score - np.mean(
        [event.winner_score, event.loser_score]))))  # fmt: skip
    assert after.source == event.winner and after.round == 10 and after.record == ()

    # A winner that is an unstepped copy of the stale champion does not retire it.
    copies = init_population(config)
    for member in copies:
        member.theta = stale.theta
    event, after = tournament(copies, InProcessFarm().map, config, np.random.default_rng(0), 2, 12, stale)
    assert not event.champion_retired and len(after.record) == 3

    # The same champion with no record against it is kept and restores the loser.
    fresh = dataclasses.replace(stale, record=())
    event, after = tournament(members, InProcessFarm().map, config, np.random.default_rng(0), 1, 11, fresh)
    assert not event.champion_retired and event.source == "champion" and len(after.record) == 1


def _allocating(config, floor=0.2):
    return dataclasses.replace(config, pbt=dataclasses.replace(config.pbt, task_allocation="spread",
                                                               allocation_floor=floor))


def _nine_families(config):
    from selfloop.config import USER_FAMILIES

    return dataclasses.replace(config, tasks=dataclasses.replace(config.tasks, families=USER_FAMILIES))


def test_uniform_allocation_draws_the_tournament_tasks_of_before_with_unit_weights(smoke_config):
    config = _nine_families(smoke_config)
    spread = FamilySpread(np.arange(9.0), np.ones(9))  # ignored: the allocation is uniform
    specs, weights = draw_tasks(config, 7, 12, 0x7B7, family_probabilities(config, spread))
    assert specs == tournament_tasks(config, 7, 12) and np.all(weights == 1.0)


def test_spread_allocation_draws_where_contestants_differ_and_stays_unbiased(smoke_config):
    config = _allocating(_nine_families(smoke_config))
    families = config.tasks.families
    spread = FamilySpread.unseen(len(families))
    assert family_probabilities(config, spread) is None  # nothing seen yet: uniform
    # Contestants agree on every family but digits_mlp, where they differ by 0.3.
    specs = [tournament_tasks(config, 0, 1, probabilities=np.eye(9)[families.index(f)])[0] for f in families]
    per_task = np.array([[0.2, 0.5] if s.family == "digits_mlp" else [0.2, 0.2001] for s in specs])
    for _ in range(40):
        observe_spread(spread, families, specs, per_task)
    probabilities = family_probabilities(config, spread)
    assert probabilities.sum() == pytest.approx(1.0)
    assert probabilities[families.index("digits_mlp")] > 0.8
    assert probabilities.min() >= 0.2 / 9 - 1e-12  # the floor: every family still drawn
    # The weighted mean of any per-family score estimates the uniform mixture's mean.
    value = {f: float(i) for i, f in enumerate(families)}
    draws = [draw_tasks(config, event, 4, 0x7B7, probabilities) for event in range(3000)]
    estimates = [np.mean([w * value[s.family] for s, w in zip(d_specs, d_weights)]) for d_specs, d_weights in draws]
    drawn = np.array([s.family == "digits_mlp" for d_specs, _ in draws for s in d_specs])
    assert drawn.mean() > 0.75
    assert np.mean(estimates) == pytest.approx(np.mean(list(value.values())), abs=5 * np.std(estimates) / 55)


def test_a_non_finite_score_does_not_enter_the_spread(smoke_config):
    config = _allocating(smoke_config)
    spread = FamilySpread.unseen(2)
    specs = tournament_tasks(config, 0, 2, probabilities=np.array([1.0, 0.0]))
    observe_spread(spread, config.tasks.families, specs, np.array([[0.2, np.inf], [0.2, 0.4]]))
    assert spread.weight[0] > 0 and np.isfinite(spread.total).all()
    assert spread.total[0] / spread.weight[0] == pytest.approx(0.02)  # only the finite task: var(0.2, 0.4)


def test_a_tournament_with_spread_allocation_learns_the_spread_and_logs_its_draw(smoke_config):
    config = _allocating(smoke_config)
    members = init_population(config)
    spread = FamilySpread.unseen(len(config.tasks.families))
    rng, champion = np.random.default_rng(3), None
    for event_index in range(4):
        event, champion = tournament(members, InProcessFarm().map, config, rng, event_index, event_index,
                                     champion, spread)
        assert event is not None
        assert event.allocation == () if event_index == 0 else len(event.allocation) == 2
    assert spread.weight.sum() > 0 and sum(event.allocation) == pytest.approx(1.0)
