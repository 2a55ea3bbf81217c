"""The farm: pinned workers, a killed worker replaced, failures reported, Dask equal to local."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

from selfloop.config import PopulationConfig
from selfloop.farm.engines import InProcessFarm, LocalFarm, UnitFailure, dispatch_order
from selfloop.farm.units import run_unit
from selfloop.master.population import context_for, init_population, meta_batch_tasks
from selfloop.master.trainer import Trainer, make_units
from selfloop.state import RunState


def _affinity(_item):
    return sorted(os.sched_getaffinity(0))


def _start_time(seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return seconds, start


def _die_once(marker: str, fn, item):
    """Kill this worker process (SIGKILL, as the OOM killer would) the first time."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # atomic: exactly one worker dies
    except FileExistsError:
        return fn(item)
    os.kill(os.getpid(), signal.SIGKILL)
    return fn(item)


def _fail_for_member(member: int, fn, unit):
    if unit.member == member:
        raise RuntimeError(f"unit of member {member} always fails")
    return fn(unit)


@pytest.fixture(scope="module")
def local_farm(tmp_path_factory):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    farm = LocalFarm(workers=2, log_dir=tmp_path_factory.mktemp("workers"), max_attempts=2)
    farm.wait_ready()
    yield farm
    farm.close()


def test_each_worker_pinned_to_its_own_core(local_farm):
    affinities = local_farm.wait_ready()
    assert all(len(a) == 1 for a in affinities)
    assert len({a[0] for a in affinities}) == 2
    seen = {tuple(a) for a in local_farm.map(_affinity, list(range(8)))}
    assert seen <= {tuple(a) for a in affinities} and all(len(a) == 1 for a in seen)


def test_costly_units_start_first_and_results_keep_item_order(local_farm):
    assert dispatch_order(4, [0.1, 0.3, 0.2, 0.3]) == [1, 3, 2, 0] and dispatch_order(3, None) == [0, 1, 2]
    seconds = [0.02] * 8 + [0.3, 0.2]  # the long units come last in item order
    results = local_farm.map(_start_time, seconds, cost=seconds)
    assert [r[0] for r in results] == seconds
    starts = sorted(range(len(seconds)), key=lambda i: results[i][1])
    assert set(starts[:2]) == {8, 9}  # one on each worker, before any short unit


def _doubled(x):
    return x * 2


def _none_for_odd(x):
    return None if x % 2 else x


def test_a_unit_that_returns_none_completes(local_farm):
    results: list = []
    mapper = threading.Thread(target=lambda: results.append(local_farm.map(_none_for_odd, list(range(4)))),
                              daemon=True)
    mapper.start()
    mapper.join(timeout=60)
    assert not mapper.is_alive(), "farm.map waited forever on a unit whose result is None"
    assert results[0] == [0, None, 2, None]


def test_units_and_results_larger_than_a_pipe_buffer_do_not_deadlock(local_farm):
    # A queued unit of 2.4 MB blocks the master's send until the busy worker
    # reads it, while the worker sends its own 2.4 MB result back.
    items = [np.full(300_000, float(i)) for i in range(6)]
    results: list = []
    mapper = threading.Thread(target=lambda: results.append(local_farm.map(_doubled, items)), daemon=True)
    mapper.start()
    mapper.join(timeout=120)
    assert not mapper.is_alive(), "farm.map deadlocked on large messages"
    assert [float(r[0]) for r in results[0]] == [2.0 * i for i in range(6)]


def test_killed_worker_is_replaced_and_every_member_advances(local_farm, smoke_config, tmp_path):
    trainer = Trainer(smoke_config, tmp_path, report=lambda record: None, farm=local_farm)
    state = trainer.new_state()
    marker = str(tmp_path / "killed")
    restarts = local_farm.stats.restarts
    real_map = local_farm.map
    local_farm.map = lambda fn, items, cost=None: real_map(functools.partial(_die_once, marker, fn), items, cost)
    try:
        trainer.run_round(state)
        trainer.run_round(state)
    finally:
        local_farm.map = real_map
    assert os.path.exists(marker)  # a worker really died mid-unit
    assert local_farm.stats.restarts == restarts + 1
    assert all(m.steps == 2 for m in state.members)


def test_unit_that_keeps_failing_is_reported_and_skipped(smoke_config, tmp_path):
    records = []
    farm = InProcessFarm(max_attempts=2)
    trainer = Trainer(smoke_config, tmp_path, report=records.append, farm=farm)
    state = trainer.new_state()
    real_map = farm.map
    farm.map = lambda fn, items, cost=None: real_map(functools.partial(_fail_for_member, 1, fn), items, cost)
    trainer.run_round(state)
    failed = [r for r in records if r.kind == "unit_failed"]
    assert len(failed) == smoke_config.population.tasks_per_member and failed[0].member == 1
    assert failed[0].attempts == 2 and "always fails" in failed[0].error
    assert state.members[1].steps == 0
    assert all(m.steps == 1 for i, m in enumerate(state.members) if i != 1)
    assert records[-1].kind == "round" and records[-1].failed_units == len(failed)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


def test_dask_local_cluster_gives_the_local_pool_result(local_farm, smoke_config):
    distributed = pytest.importorskip("distributed")
    from selfloop.farm.cluster import DaskFarm

    state = RunState(members=init_population(smoke_config))
    units = make_units(state)
    fn = functools.partial(run_unit, context_for(smoke_config))
    local = local_farm.map(fn, units)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        farm = DaskFarm(cluster)
        try:
            remote = farm.map(fn, units)
        finally:
            farm.close()
    for a, b in zip(local, remote):
        assert not isinstance(a, UnitFailure) and not isinstance(b, UnitFailure)
        np.testing.assert_array_equal(_flat(a.gradient), _flat(b.gradient))
        np.testing.assert_array_equal(_flat(a.state), _flat(b.state))
        assert a.meta_loss == b.meta_loss


@pytest.mark.parametrize("workers, tasks", [(0, 2), (1, 2), (2, 2), (14, 2), (15, 3), (16, 3), (20, 2), (64, 6),
                                            (200, 20)])
def test_the_meta_batch_fills_the_waves_of_units_a_round_runs_anyway(workers, tasks):
    population = PopulationConfig()  # 10 members, at least 2 tasks each
    assert meta_batch_tasks(population, workers) == tasks
    waves = -(-population.size * population.tasks_per_member // max(workers, 1))
    assert population.size * tasks <= waves * max(workers, 1)  # no round needs a wave more
    assert meta_batch_tasks(dataclasses.replace(population, fill_farm=False), workers) == 2
