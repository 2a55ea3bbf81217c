"""Checkpoints: exact resume, crash safety under kill -9, corrupt files, the lock."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest

from selfloop.config import ConfigError, config_to_dict
from selfloop.events import cut_torn_line, from_record, read_events
from selfloop.master.trainer import Trainer
from selfloop.observe.history import latest_series, summary
from selfloop.observe.plain import format_event
from selfloop.store.checkpoint import (
    CheckpointError,
    check_resumable,
    checkpoint_problem,
    list_checkpoints,
    load_latest,
    prune,
    read_checkpoint,
    write_checkpoint,
)
from selfloop.store.rundir import RunLock, RunLocked

REPO = Path(__file__).resolve().parent.parent


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _assert_same_population(a, b):
    assert a.round == b.round
    for ma, mb in zip(a.members, b.members):
        for name in ("theta", "outer_state"):
            for x, y in zip(_leaves(getattr(ma, name)), _leaves(getattr(mb, name))):
                np.testing.assert_array_equal(x, y)
        assert (ma.outer_index, ma.truncation, ma.steps, ma.step_scale) == (
            mb.outer_index, mb.truncation, mb.steps, mb.step_scale)
        for sa, sb in zip(ma.slots, mb.slots):
            assert sa.spec == sb.spec
            for x, y in zip(_leaves(sa.state), _leaves(sb.state)):
                np.testing.assert_array_equal(x, y)


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(smoke_config, tmp_path):
    """Stop after round 3, resume from the checkpoint, run to round 7: the same
    weights, outer states, inner problems and PBT decisions as a run that never
    stopped. PBT, evaluation and checkpoints go by rounds here (smoke config);
    only time-based triggers would make two runs differ."""
    straight = Trainer(smoke_config, tmp_path / "straight", report=lambda r: None)
    straight.prepare()
    uninterrupted = straight.new_state()
    straight.train(uninterrupted, max_rounds=7)

    first = Trainer(smoke_config, tmp_path / "split", report=lambda r: None)
    first.prepare()
    first.train(first.new_state(), max_rounds=3)
    state, path = load_latest(tmp_path / "split", smoke_config, on_skip=lambda p, e: pytest.fail(e))
    assert path.name == "checkpoint-000000003.h5" and state.resumed_from == 3
    second = Trainer(smoke_config, tmp_path / "split", report=lambda r: None)
    second.prepare()
    second.train(state, max_rounds=7)

    _assert_same_population(uninterrupted, state)
    assert uninterrupted.pbt_events == state.pbt_events
    assert uninterrupted.pbt_rng.bit_generator.state == state.pbt_rng.bit_generator.state
    assert any(m.steps > 0 for m in state.members)
    assert state.champion is not None and state.champion.round == uninterrupted.champion.round
    for x, y in zip(_leaves(state.champion.theta), _leaves(uninterrupted.champion.theta)):
        np.testing.assert_array_equal(x, y)


def _checkpointed_rounds(config, run_dir: Path, rounds: int):
    """A smoke run with a checkpoint after each of ``rounds`` rounds; its state."""
    trainer = Trainer(config, run_dir, report=lambda r: None)
    state = trainer.new_state()
    for _ in range(rounds):
        trainer.run_round(state)
        trainer.checkpoint(state)
    return state


def test_a_population_of_adaptive_lopts_round_trips(smoke_config, tmp_path):
    """Per-weight second moments in the outer and inner lopt states are saved and read back exactly."""
    config = dataclasses.replace(smoke_config, lopt=dataclasses.replace(smoke_config.lopt, features="adaptive"))
    state = _checkpointed_rounds(config, tmp_path, 2)
    assert type(state.members[0].outer_state).__name__ == "AdaptiveMLPLOptState"
    assert any(np.any(np.asarray(v) > 0) for v in jax.tree_util.tree_leaves(state.members[0].outer_state.second_moment))
    _assert_same_population(state, read_checkpoint(list_checkpoints(tmp_path)[0], config))


def test_checkpoint_is_self_describing_and_keeps_the_newest(smoke_config, tmp_path):
    state = _checkpointed_rounds(smoke_config, tmp_path, 5)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == [f"checkpoint-{r:09d}.h5" for r in (5, 4, 3)]  # keep = 3
    assert not list(tmp_path.glob(".checkpoint-*"))
    with h5py.File(tmp_path / names[0], "r") as handle:
        assert handle.attrs["format"] == "selfloop-checkpoint" and handle.attrs["round"] == 5
        assert json.loads(handle.attrs["config_json"])["population"]["size"] == smoke_config.population.size
        for key in ("version_selfloop", "version_jax", "version_jaxlib"):
            assert handle.attrs[key]
        member = handle["members/001"]
        assert member["theta/layer0/w"].shape == np.asarray(state.members[1].theta["layer0"]["w"]).shape
        np.testing.assert_array_equal(member["theta/layer0/w"][()], state.members[1].theta["layer0"]["w"])
        assert member.attrs["truncation"] == state.members[1].truncation
        assert "description" in member["theta"].attrs and "description" in handle["controller"].attrs


def test_truncated_newest_checkpoint_is_reported_and_the_previous_one_used(smoke_config, tmp_path):
    _checkpointed_rounds(smoke_config, tmp_path, 2)
    newest = list_checkpoints(tmp_path)[0]
    with open(newest, "r+b") as handle:
        handle.truncate(newest.stat().st_size // 2)
    skipped = []
    resumed, path = load_latest(tmp_path, smoke_config, on_skip=lambda p, e: skipped.append((p, e)))
    assert [p for p, _ in skipped] == [newest] and newest.name in skipped[0][1]
    assert path.name == "checkpoint-000000001.h5" and resumed.round == 1


def test_a_config_that_changes_what_the_checkpoint_holds_is_refused(smoke_config, tmp_path):
    saved = config_to_dict(smoke_config)
    bigger = dataclasses.replace(smoke_config, population=dataclasses.replace(smoke_config.population, size=6))
    with pytest.raises(ConfigError, match="population.size"):
        check_resumable(saved, bigger, "run")
    wider = dataclasses.replace(smoke_config, lopt=dataclasses.replace(smoke_config.lopt, hidden=16))
    with pytest.raises(ConfigError, match="lopt.hidden"):
        check_resumable(saved, wider, "run")
    # What may change on resume: workers, dashboard, time limits, cadences.
    farm = dataclasses.replace(smoke_config.farm, workers=7)
    run = dataclasses.replace(smoke_config.run, max_minutes=5.0)
    check_resumable(saved, dataclasses.replace(smoke_config, farm=farm, run=run), "run")


def _rounds_with_tournaments(config, run_dir: Path, rounds: int):
    """A smoke run of ``rounds`` rounds, each followed by a tournament when due, then
    a checkpoint; its state and the checkpoint's path."""
    trainer = Trainer(config, run_dir, report=lambda r: None)
    state = trainer.new_state()
    for _ in range(rounds):
        trainer.run_round(state)
        trainer.run_if_due("pbt", state)
    trainer.checkpoint(state)
    return state, list_checkpoints(run_dir)[0]


def test_a_checkpoint_from_before_step_scales_loads_with_scale_one(smoke_config, tmp_path):
    state, path = _rounds_with_tournaments(smoke_config, tmp_path, 6)
    assert state.champion is not None and len({m.step_scale for m in state.members}) > 1  # PBT explored them
    with h5py.File(path, "r+") as handle:
        for i in range(smoke_config.population.size):
            del handle[f"members/{i:03d}"].attrs["step_scale"]
        del handle["champion"].attrs["step_scale"]
    resumed = read_checkpoint(path, smoke_config)
    assert [m.step_scale for m in resumed.members] == [1.0] * smoke_config.population.size
    assert resumed.champion.step_scale == 1.0


def test_the_champion_record_round_trips_and_is_empty_in_a_checkpoint_from_before_it(smoke_config, tmp_path):
    # No challenge can win: the first champion stays and keeps its record.
    pbt = dataclasses.replace(smoke_config.pbt, champion_record=50, champion_confidence=1e9)
    config = dataclasses.replace(smoke_config, pbt=pbt)
    state, path = _rounds_with_tournaments(config, tmp_path, 8)
    assert len(state.champion.record) > 1
    assert read_checkpoint(path, config).champion.record == state.champion.record
    with h5py.File(path, "r+") as handle:
        del handle["champion/record"]
    assert read_checkpoint(path, config).champion.record == ()


def test_the_family_spread_round_trips_and_is_absent_from_a_uniform_run(smoke_config, tmp_path):
    pbt = dataclasses.replace(smoke_config.pbt, task_allocation="spread")
    config = dataclasses.replace(smoke_config, pbt=pbt)
    state, path = _rounds_with_tournaments(config, tmp_path / "spread", 6)
    assert state.family_spread is not None and state.family_spread.weight.sum() > 0
    resumed = read_checkpoint(path, config)
    np.testing.assert_array_equal(resumed.family_spread.total, state.family_spread.total)
    np.testing.assert_array_equal(resumed.family_spread.weight, state.family_spread.weight)
    state, path = _rounds_with_tournaments(smoke_config, tmp_path / "uniform", 4)
    assert state.family_spread is None and read_checkpoint(path, smoke_config).family_spread is None


def _flip_a_bit(path: Path, dataset: str) -> None:
    with h5py.File(path, "r+") as handle:
        data = handle[dataset][()]
        data.view(np.uint8).reshape(-1)[3] ^= 0x10
        handle[dataset][...] = data  # the stored checksum is left as it was


def test_a_flipped_bit_is_detected_and_resume_falls_back_to_the_newest_good_checkpoint(smoke_config, tmp_path):
    _checkpointed_rounds(smoke_config, tmp_path, 3)
    newest = list_checkpoints(tmp_path)[0]
    _flip_a_bit(newest, "members/001/theta/layer1/w")
    with pytest.raises(CheckpointError, match="/members/001/theta/layer1/w does not match its checksum"):
        read_checkpoint(newest, smoke_config)
    assert "does not match its checksum" in checkpoint_problem(newest)
    skipped = []
    state, path = load_latest(tmp_path, smoke_config, on_skip=lambda p, e: skipped.append(p))
    assert skipped == [newest] and path.name == "checkpoint-000000002.h5" and state.round == 2


def test_pruning_never_counts_a_bad_checkpoint_nor_deletes_the_last_good_one(smoke_config, tmp_path):
    trainer = Trainer(smoke_config, tmp_path, report=lambda r: None)  # keep = 3
    state = trainer.new_state()
    trainer.checkpoint(state)  # round 0: the only good one, after what follows
    for _ in range(4):
        trainer.run_round(state)
        write_checkpoint(tmp_path, state, smoke_config)
        _flip_a_bit(list_checkpoints(tmp_path)[0], "members/000/theta/layer0/w")
    prune(tmp_path, smoke_config.checkpoint.keep)
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "checkpoint-000000000.h5"
    assert checkpoint_problem(list_checkpoints(tmp_path)[-1]) is None
    for _ in range(3):  # three good ones newer than every bad one: now those go
        trainer.run_round(state)
        trainer.checkpoint(state)
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint-{r:09d}.h5" for r in (7, 6, 5)]


def test_a_tensor_of_the_wrong_shape_names_the_file_and_the_key(smoke_config, tmp_path):
    trainer = Trainer(smoke_config, tmp_path, report=lambda r: None)
    trainer.checkpoint(trainer.new_state())
    path = list_checkpoints(tmp_path)[0]
    with h5py.File(path, "r+") as handle:
        del handle["members/002/theta/layer1/w"]
        handle["members/002/theta/layer1/w"] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path, smoke_config)
    assert path.name in str(error.value) and "/members/002/theta/layer1/w" in str(error.value)


def test_lock_refuses_a_second_holder_and_names_it(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # released: free again


# --- the real master under kill -9 -------------------------------------------------------------


def _start_master(run_dir: Path, cache: Path, max_rounds: int) -> subprocess.Popen:
    command = [
        sys.executable, "run.py", "--config", "configs/smoke.toml", "--checkpoint-dir", str(run_dir),
        "--compile-cache", str(cache), "--max-rounds", str(max_rounds),
        "--set", "checkpoint.interval_rounds=1", "--set", "pbt.interval_rounds=3", "--set", "eval.interval_rounds=50",
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout: float, poll: float = 0.001) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def _checkpoints_logged(run_dir: Path) -> int:
    events = run_dir / "events.jsonl"
    return events.read_text().count('"kind": "checkpoint"') if events.exists() else 0


def _newest_round(run_dir: Path, config) -> int:
    state, _ = load_latest(run_dir, config, on_skip=lambda p, e: pytest.fail(f"{p}: {e}"))
    return state.round


@pytest.mark.slow
def test_kill_9_at_random_moments_always_leaves_a_resumable_checkpoint(smoke_config, tmp_path, compile_cache):
    run_dir, cache = tmp_path / "run", Path(compile_cache)
    rng = random.Random(0)
    config = dataclasses.replace(smoke_config, run=dataclasses.replace(smoke_config.run, checkpoint_dir=str(run_dir)))
    rounds_seen = []
    for attempt in range(2):  # a kill at a random moment, then one during a checkpoint write
        written_before = _checkpoints_logged(run_dir)
        master = _start_master(run_dir, cache, max_rounds=100_000)
        try:
            # Once this master has written a checkpoint of its own, kill it at a random moment.
            assert _wait_for(lambda n=written_before: _checkpoints_logged(run_dir) > n, 120)
            if attempt == 0:
                # A second master on the same directory is refused and told who holds it.
                second = subprocess.run(
                    [sys.executable, "run.py", "--config", "configs/smoke.toml", "--checkpoint-dir", str(run_dir)],
                    cwd=REPO, capture_output=True, text=True, timeout=120,
                )  # fmt: skip
                assert second.returncode == 3 and f"pid {master.pid}" in second.stderr
            if attempt == 1:
                # Kill while a checkpoint is being written (its temporary file exists).
                assert _wait_for(lambda: any(run_dir.glob(".checkpoint-*.tmp")), 120)
            else:
                time.sleep(rng.uniform(0.0, 2.0))
        finally:
            master.send_signal(signal.SIGKILL)
            master.wait()
        rounds_seen.append(_newest_round(run_dir, config))  # readable after every kill

    # Truncate the newest: the next master says so and resumes from the one before.
    newest, previous = list_checkpoints(run_dir)[:2]
    with open(newest, "r+b") as handle:
        handle.truncate(newest.stat().st_size // 3)
    resumed_round = int(previous.name[len("checkpoint-") : -len(".h5")])
    master = _start_master(run_dir, cache, max_rounds=resumed_round + 2)
    stdout, stderr = master.communicate(timeout=300)
    assert master.returncode == 0, stderr[-3000:]
    assert newest.name in stderr
    records = [from_record(json.loads(line)) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    resumes = [r for r in records if r.kind == "resume"]
    # Each master resumed from the newest checkpoint its predecessor left.
    assert [r.round for r in resumes] == [*rounds_seen[:-1], resumed_round]
    assert resumes[-1].path == previous.name
    assert records[-1].kind == "end" and records[-1].round == resumed_round + 2
    assert any(r.kind == "checkpoint_skipped" and r.path == newest.name for r in records)


def test_reading_a_checkpoint_before_any_training_leaves_no_tracer_behind(smoke_config):
    """Regression: checking a checkpoint traces ``new_slot`` (``Templates.slot_state``),
    which built and cached a task program inside the trace, its dataset a tracer;
    the first real unit after a resume in a fresh process then failed with
    UnexpectedTracerError. A lopt no other test builds keys a program of its own."""
    from selfloop.estimators import new_slot
    from selfloop.lopt import make_lopt
    from selfloop.master.population import context_for
    from selfloop.store.checkpoint import Templates
    from selfloop.tasks.sampler import sample_training_task

    config = dataclasses.replace(smoke_config, lopt=dataclasses.replace(smoke_config.lopt, hidden=7))
    spec = sample_training_task(np.random.default_rng(0), ("digits_mlp",))  # a family with a dataset
    Templates.of(config).slot_state(spec)
    lopt = make_lopt(config.lopt)
    state = new_slot(lopt, spec, lopt.init_theta(jax.random.PRNGKey(0)), config.estimator, context_for(config).horizon)
    assert all(np.isfinite(leaf).all() for leaf in _leaves(state.inners))


def test_families_left_out_of_training_are_evaluated_beside_the_heldout_set(smoke_config, tmp_path):
    tasks = dataclasses.replace(smoke_config.tasks, families=("quadratic",))
    config = dataclasses.replace(smoke_config, tasks=tasks,
                                 eval=dataclasses.replace(smoke_config.eval, unseen_families=("test2d",)))
    records = []
    trainer = Trainer(config, tmp_path, report=records.append)
    assert {s.family for s in trainer.heldout} == {"quadratic"} and {s.family for s in trainer.unseen} == {"test2d"}
    assert len(trainer.unseen) == len(trainer.heldout)  # as many tasks per family as the in-family set
    trainer.prepare()
    state = trainer.begin(None)
    trainer.train(state, max_rounds=2)
    evals = [r for r in records if r.kind == "eval"]
    assert evals and all(len(e.unseen.members) == config.population.size for e in evals)
    assert all(e.unseen.members is not e.members for e in evals)
    assert np.all(np.isfinite(evals[-1].unseen.members)) and evals[-1].unseen.adam_tuned <= 1.0
    # Held-out sets differ by family, so the two columns are different numbers.
    assert not np.allclose(evals[-1].unseen.members, evals[-1].members)


def test_a_torn_last_line_of_the_event_log_is_cut_before_the_next_session_writes(tmp_path):
    log = tmp_path / "events.jsonl"
    log.write_text('{"kind": "start"}\n{"kind": "round"}\n{"kind": "ro')
    assert cut_torn_line(log) == len('{"kind": "ro') and log.read_text().endswith('"round"}\n')
    assert cut_torn_line(log) == 0 and cut_torn_line(tmp_path / "none.jsonl") == 0
    log.write_text("no newline at all")
    assert cut_torn_line(log) == len("no newline at all") and log.read_text() == ""


def test_a_resume_with_another_heldout_set_starts_a_new_labelled_series(smoke_config, tmp_path):
    first = Trainer(smoke_config, tmp_path, report=lambda r: None)
    first.prepare()
    first.train(first.begin(None), max_rounds=2)
    with open(tmp_path / "events.jsonl", "a") as handle:
        handle.write('{"kind": "rou')  # a crash mid-write
    other = dataclasses.replace(smoke_config, eval=dataclasses.replace(smoke_config.eval, tasks=4))
    second = Trainer(other, tmp_path, report=lambda r: None)
    state = second.begin(load_latest(tmp_path, other, on_skip=lambda p, e: None))
    assert all(m.history == [] for m in state.members) and state.heldout_set == second.heldout_set
    second.prepare()
    second.train(state, max_rounds=4)
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines].count("start") == 2  # the torn line was cut, not glued
    records = read_events(tmp_path / "events.jsonl")
    changed = [r for r in records if r.kind == "heldout_changed"]
    assert len(changed) == 1 and changed[0].before == first.heldout_set != second.heldout_set
    evals, _, earlier = latest_series(records)
    assert earlier == 1 and {e.heldout_set for e in evals} == {second.heldout_set}
    assert evals[0].round >= 2 and "1 earlier series" in summary(records)


def test_a_resume_with_other_truncations_redraws_every_k_no_longer_listed(smoke_config, tmp_path):
    first = Trainer(smoke_config, tmp_path, report=lambda r: None)
    state = first.begin(None)
    for member, k in zip(state.members, (10, 20, 10, 20)):
        member.truncation = k
    first.checkpoint(state)
    other = dataclasses.replace(smoke_config,
                                population=dataclasses.replace(smoke_config.population, truncations=(20, 40)))
    lines = []
    second = Trainer(other, tmp_path, report=lambda event: lines.append(format_event(event)))
    resumed = second.begin(load_latest(tmp_path, other, on_skip=lambda p, e: None))
    assert [m.truncation for m in resumed.members][1::2] == [20, 20]  # still listed: kept
    assert all(m.truncation in (20, 40) for m in resumed.members)
    redrawn = [r for r in read_events(tmp_path / "events.jsonl") if r.kind == "truncations_redrawn"]
    assert len(redrawn) == 1 and redrawn[0].members == (0, 2) and redrawn[0].before == (10, 10)
    assert redrawn[0].after == (resumed.members[0].truncation, resumed.members[2].truncation)
    assert any(line and "K redrawn for m0 (10 -> " in line for line in lines)
    # Resumed again with the same list, nothing is redrawn.
    second.checkpoint(resumed)
    Trainer(other, tmp_path, report=lambda r: None).begin(load_latest(tmp_path, other, on_skip=lambda p, e: None))
    assert sum(r.kind == "truncations_redrawn" for r in read_events(tmp_path / "events.jsonl")) == 1


def test_a_resume_on_a_bigger_farm_grows_every_members_meta_batch_and_a_smaller_one_shrinks_it(smoke_config,
                                                                                                 tmp_path):
    first = Trainer(smoke_config, tmp_path, report=lambda r: None)
    first.prepare()
    first.train(first.begin(None), max_rounds=2)  # slots mid-episode, checkpointed
    saved = read_checkpoint(list_checkpoints(tmp_path)[0], smoke_config)
    assert all(len(m.slots) == 1 for m in saved.members)

    first.farm.stats.workers = 12  # 4 members x 1 task fill one wave of 4: 12 workers hold 3 each
    lines = []
    first.log.report = lambda event: lines.append(format_event(event))
    grown = first.begin(load_latest(tmp_path, smoke_config, on_skip=lambda p, e: None))
    assert all(len(m.slots) == 3 for m in grown.members)
    for kept, member in zip(saved.members, grown.members):  # the running problem goes on; two new ones start
        assert member.slots[0].spec == kept.slots[0].spec
        assert [int(s.state.episode.index) for s in member.slots[1:]] == [0, 0]
    assert any(line and "meta-batch of 3 tasks per member on 12 workers (resized from 1)" in line for line in lines)
    first.train(grown, max_rounds=3)
    rounds = [r for r in read_events(tmp_path / "events.jsonl") if r.kind == "round"]
    assert rounds[-1].estimates == 12 and rounds[-1].failed_units == 0
    assert all(len(m.slots) == 3 for m in read_checkpoint(list_checkpoints(tmp_path)[0], smoke_config).members)

    fixed = dataclasses.replace(smoke_config, population=dataclasses.replace(smoke_config.population,
                                                                             fill_farm=False))
    shrunk = Trainer(fixed, tmp_path, report=lambda r: None).begin(load_latest(tmp_path, fixed,
                                                                              on_skip=lambda p, e: None))
    assert all(len(m.slots) == 1 for m in shrunk.members)
    resized = [r for r in read_events(tmp_path / "events.jsonl") if r.kind == "meta_batch"]
    assert [(r.before, r.tasks) for r in resized] == [(0, 1), (1, 3), (3, 1)]
