"""The master's jobs (PBT, checkpoints, evaluations) run on their cadence."""

from __future__ import annotations

from selfloop.master.trainer import Cadence


def test_a_cadence_is_due_by_seconds_or_by_rounds_and_never_when_both_are_off():
    by_time, by_rounds, both = Cadence(seconds=10.0), Cadence(rounds=3), Cadence(seconds=10.0, rounds=3)
    assert not by_time.due(9.9, 1000) and by_time.due(10.0, 0)
    assert not by_rounds.due(1e9, 2) and by_rounds.due(0.0, 3)
    assert both.due(10.0, 0) and both.due(0.0, 3) and not both.due(9.9, 2)
    assert not Cadence().due(1e9, 10**9)


def test_the_trainer_runs_a_job_when_due_and_the_job_marks_it(smoke_config, tmp_path):
    from selfloop.master.trainer import Trainer

    trainer = Trainer(smoke_config, tmp_path, report=lambda r: None)
    state = trainer.new_state()
    every = smoke_config.pbt.interval_rounds  # the smoke config's PBT runs by rounds
    for _ in range(every - 1):
        trainer.run_round(state)
    trainer.run_if_due("pbt", state)
    assert state.pbt_events == 0
    trainer.run_round(state)
    trainer.run_if_due("pbt", state)
    assert state.pbt_events == 1 and state.last_pbt_round == state.round == every
    trainer.run_if_due("pbt", state)  # just ran: not due again
    assert state.pbt_events == 1
