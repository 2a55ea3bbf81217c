"""The master loop: rounds of outer steps, PBT tournaments, held-out evaluation.

One round gives every member one outer step: its units (one per persistent
inner problem) run on the farm from a snapshot of the population, then every
member is updated by its outer optimizer's lopt. PBT scoring, held-out
evaluation and the Adam reference are farm units too, so the master only
dispatches and applies outer steps. Everything observable leaves as a typed
event (``selfloop.events``), reported and appended to ``events.jsonl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from selfloop import events
from selfloop.config import Config, EstimatorConfig, config_to_dict
from selfloop.estimators import clip_outliers, inner_steps_per_unit
from selfloop.evaluation.heldout import EvaluationFailed, adam_reference, evaluate_members
from selfloop.events import EventLog, Report
from selfloop.farm.engines import InProcessFarm, Interrupted, UnitFailure, reporting_progress
from selfloop.farm.units import UnitResult, WorkUnit, run_unit, warm_up
from selfloop.lopt import make_lopt
from selfloop.master import guard
from selfloop.master.pbt import ScoringFailed, tournament
from selfloop.master.population import (
    apply_outer_steps,
    context_for,
    init_population,
    meta_batch_tasks,
    outer_settings,
    redraw_unlisted_truncations,
    resize_meta_batches,
)
from selfloop.master.session import PhaseProgress, Session
from selfloop.state import FamilySpread, RunState
from selfloop.store.checkpoint import prune, write_checkpoint
from selfloop.store.rundir import RunDir
from selfloop.tasks.sampler import heldout_tasks, unseen_family_tasks

HISTORY_SHOWN = 40  # held-out scores per member repeated in a resume record (the dashboard's trend)


@dataclasses.dataclass(frozen=True)
class Cadence:
    """Due every ``seconds`` of run time and/or every ``rounds`` rounds (0: not by that measure)."""

    seconds: float = 0.0
    rounds: int = 0

    def due(self, seconds_since: float, rounds_since: int) -> bool:
        by_time = self.seconds > 0 and seconds_since >= self.seconds
        by_rounds = self.rounds > 0 and rounds_since >= self.rounds
        return by_time or by_rounds


def make_units(state: RunState) -> list[WorkUnit]:
    """This round's units, one per member and persistent inner problem."""
    return [
        WorkUnit(round=state.round, member=i, slot=s, theta=m.theta, spec=slot.spec, state=slot.state,
                 truncation=m.truncation)
        for i, m in enumerate(state.members)
        for s, slot in enumerate(m.slots)
    ]


def absorb_results(state: RunState, results: Iterable[UnitResult], estimator: EstimatorConfig) -> dict[int, list]:
    """Store advanced inner states; return meta-gradients grouped by member."""
    gradients: dict[int, list] = {}
    losses: dict[int, list[float]] = {}
    for result in results:
        slot = state.members[result.member].slots[result.slot]
        slot.spec, slot.state = result.spec, result.state
        gradients.setdefault(result.member, []).append(result.gradient)
        losses.setdefault(result.member, []).append(result.meta_loss)
        state.inner_steps += inner_steps_per_unit(estimator, state.members[result.member].truncation)
    for i, values in losses.items():
        state.members[i].meta_loss = float(np.mean(values))
    return gradients


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def held_out_scores(result, size: int, has_champion: bool) -> events.Scores:
    """Members' (and the champion's) mean normalized held-out loss beside Adam's on the same tasks."""
    scores = result.members[:size]
    return events.Scores(
        members=_floats(scores), best=float(scores.min()),
        champion=float(result.members[size]) if has_champion else None,
        adam_fixed=_floats(result.adam_fixed), adam_best_fixed=float(result.best_fixed_adam),
        adam_tuned=float(result.adam_tuned),
    )  # fmt: skip


class Trainer:
    """Holds what a run needs: config, farm, lopt, held-out set and its Adam reference."""

    def __init__(self, config: Config, run_dir: Path, report: Report, farm=None, session: Session | None = None):
        self.config, self.run_dir = config, run_dir
        self.session = session or Session()
        self.farm = farm if farm is not None else InProcessFarm(config.farm.max_attempts)
        self.farm.should_stop = self.session.must_end  # every phase on the farm ends when the session must
        self.log = EventLog(RunDir(run_dir).events, report)
        self.lopt = make_lopt(config.lopt)
        self.context = context_for(config)
        cfg = config.eval
        self.heldout = heldout_tasks(cfg.tasks, config.tasks.families, cfg.seed)
        self.unseen = unseen_family_tasks(cfg.tasks, config.tasks.families, cfg.unseen_families, cfg.seed)
        # Which held-out tasks and horizon the scores are on: a run resumed with
        # other eval.* settings starts a new series, never mixed with the old one.
        described = json.dumps([[s.describe() for s in self.heldout], [s.describe() for s in self.unseen], cfg.steps])
        self.heldout_set = hashlib.sha256(described.encode()).hexdigest()[:12]
        self.reference = self.unseen_reference = None
        self._unit_seconds: dict[tuple[int, int], float] = {}  # (member, slot) -> last unit's compute time
        self.started = time.time()  # run time is time.time() - started; train() sets it from the state
        # What the master does between rounds, each on its own cadence; each job marks
        # when it ran in the state (last_<job>_time and _round), so a resume keeps the cadence.
        self.jobs: dict[str, tuple[Cadence, Callable[[RunState], Any]]] = {
            "pbt": (Cadence(config.pbt.interval_seconds, config.pbt.interval_rounds), self.pbt),
            "checkpoint": (Cadence(config.checkpoint.interval_seconds, config.checkpoint.interval_rounds),
                           self.checkpoint),
            "eval": (Cadence(config.eval.interval_seconds, config.eval.interval_rounds), self.evaluate),
        }

    def run_time(self) -> float:
        return time.time() - self.started

    def mark(self, job: str, state: RunState, at: float | None = None) -> None:
        """Note in ``state`` that ``job`` ran now (or at run time ``at``), from which its cadence counts."""
        setattr(state, f"last_{job}_time", self.run_time() if at is None else at)
        setattr(state, f"last_{job}_round", state.round)

    def run_if_due(self, job: str, state: RunState) -> None:
        cadence, run = self.jobs[job]
        since = self.run_time() - getattr(state, f"last_{job}_time"), state.round - getattr(state, f"last_{job}_round")
        if cadence.due(*since):
            run(state)

    def compile_seconds(self) -> float:
        """Seconds spent compiling so far, in the workers and in the master."""
        from selfloop.farm.worker import compile_seconds

        if isinstance(self.farm, InProcessFarm):
            return compile_seconds()  # the master is the worker
        return self.farm.stats.compile_seconds + compile_seconds()

    def begin(self, found: tuple[RunState, Path] | None) -> RunState:
        """Open the session's log; resume ``found`` (state, checkpoint path) or
        start a new population, checkpointed at once so that a crash from here
        on always has something to resume from."""
        resumed_from = None if found is None else found[0].round
        if self.log.torn_bytes:
            self.log.report(events.Progress(f"{self.log.path}: cut a half-written last line "
                                            f"({self.log.torn_bytes} bytes) left by a crash"))
        self.log(events.Start(
            config=config_to_dict(self.config), heldout_set=self.heldout_set,
            heldout=tuple(s.describe() for s in self.heldout), unseen=tuple(s.describe() for s in self.unseen),
            workers=self.farm.stats.workers, run_dir=str(self.run_dir), resumed_from=resumed_from,
        ))
        tasks = meta_batch_tasks(self.config.population, self.farm.stats.workers)
        if found is None:
            state = self.new_state(tasks)
            self.log(events.MetaBatch(state.round, tasks, self.farm.stats.workers, before=0))
            self.started = time.time()
            self.checkpoint(state)
            return state
        state, path = found
        if state.heldout_set and state.heldout_set != self.heldout_set:
            for member in state.members:
                member.history = []
            state.first_best = float("nan")
            self.log(events.HeldoutChanged(state.round, before=state.heldout_set, after=self.heldout_set))
        state.heldout_set = self.heldout_set
        self.log(events.Resume(
            state.round, state.elapsed, path.name, histories=tuple(_floats(m.history[-HISTORY_SHOWN:])
                                                                   for m in state.members),
            last_event=tuple(m.last_event for m in state.members),
        ))
        redrawn = redraw_unlisted_truncations(state.members, self.config.population.truncations, state.pbt_rng)
        if redrawn:
            before, after = zip(*redrawn.values())
            self.log(events.TruncationsRedrawn(state.round, members=tuple(redrawn), before=before, after=after))
        before = resize_meta_batches(state.members, tasks, self.context)
        self.log(events.MetaBatch(state.round, tasks, self.farm.stats.workers, before=before))
        return state

    @contextlib.contextmanager
    def phase(self, message: str):
        """Log that ``message``'s phase begins and show the farm's progress through it."""
        self.log(events.Progress(message))
        shown = PhaseProgress(lambda text: self.log.show(events.Progress(text)), message.split(":")[0])
        with reporting_progress(self.farm, shown):
            yield

    def prepare(self) -> None:
        """Compile the training programs on every worker; load or compute the
        Adam reference. ``Interrupted`` when the session must end."""
        with self.phase(f"compiling training programs on {self.farm.stats.workers} workers"):
            self.farm.broadcast(functools.partial(warm_up, self.context, self.config.estimator.chunk))
        cfg = self.config.eval
        with self.phase(f"Adam reference: {len(self.heldout) + len(self.unseen)} held-out tasks x 15 rates"):
            self.reference = adam_reference(self.heldout, cfg.steps, cfg.chunk, self.farm.map, self.run_dir)
            if self.unseen:
                self.unseen_reference = adam_reference(self.unseen, cfg.steps, cfg.chunk, self.farm.map,
                                                       self.run_dir)
        fixed, tuned = self.reference.summary
        self.log(events.Reference(self.heldout_set, adam_best_fixed=float(np.min(fixed)), adam_tuned=float(tuned)))

    def new_state(self, tasks: int | None = None) -> RunState:
        return RunState(
            members=init_population(self.config, tasks), pbt_rng=np.random.default_rng([self.config.run.seed, 0xB7]),
            heldout_set=self.heldout_set,
        )

    def evaluate(self, state: RunState) -> events.Eval | None:
        """Held-out evaluation of every member, and of the PBT champion beside
        them (never a member's score; what ``export --member champion`` would
        ship); None (and an event) if a unit failed."""
        cfg = self.config.eval
        champion = state.champion
        thetas = [m.theta for m in state.members] + ([champion.theta] if champion is not None else [])
        try:
            with self.phase(f"evaluating {len(thetas)} optimizers on {len(self.heldout) + len(self.unseen)} "
                            f"held-out tasks x {cfg.steps} steps"):
                result = evaluate_members(self.farm.map, self.config.lopt, thetas, self.heldout, cfg.steps,
                                          cfg.chunk, self.reference)
                unseen = None
                if self.unseen:
                    unseen = evaluate_members(self.farm.map, self.config.lopt, thetas, self.unseen, cfg.steps,
                                              cfg.chunk, self.unseen_reference)
        except EvaluationFailed as error:
            self.mark("eval", state)  # due again at its cadence
            self.log(events.EvalFailed(state.round, str(error)[-2000:]))
            return None
        size = len(state.members)
        scores = result.members[:size]
        for member, score in zip(state.members, scores):
            member.history.append(float(score))
        if math.isnan(state.first_best):  # the series' first evaluation
            state.first_best = float(scores.min())
        has_champion = champion is not None
        unseen_scores = None if unseen is None else held_out_scores(unseen, size, has_champion)
        event = events.Eval(
            **vars(held_out_scores(result, size, has_champion)), round=state.round, elapsed=self.run_time(),
            best_member=int(np.argmin(scores)), members_final=_floats(result.members_final[:size]),
            heldout_set=self.heldout_set, unseen=unseen_scores,
        )
        self.mark("eval", state)
        self.log(event)
        return event

    def _run_units(self, state: RunState) -> list[UnitResult]:
        """Every member's units on the farm; failures become events, not losses."""
        units = make_units(state)
        # Longest first, by what each slot's unit took last round (its task
        # family and K set that), so the round ends on short units.
        cost = [self._unit_seconds.get((u.member, u.slot), math.inf) for u in units]
        outcomes = self.farm.map(functools.partial(run_unit, self.context), units, cost)
        self._unit_seconds.update({(o.member, o.slot): o.seconds for o in outcomes if isinstance(o, UnitResult)})
        for failure in (o for o in outcomes if isinstance(o, UnitFailure)):
            unit = units[failure.index]
            self.log(events.UnitFailed(state.round, unit.member, unit.slot, failure.attempts, failure.error[-2000:]))
        return [o for o in outcomes if not isinstance(o, UnitFailure)]

    def _guard(self, state: RunState, gradients: dict[int, list]) -> None:
        """Roll back members whose smoothed meta-loss diverged; drop their step."""
        members, config = state.members, self.config.guard
        diverged = [i for i in gradients if guard.observe(members[i].guard, members[i].meta_loss,
                                                          members[i].theta, members[i].outer_state, config)]
        if not diverged:
            return
        trainer_index = guard.healthiest([m.guard for m in members])
        for i in diverged:
            member, ema, best_ema = members[i], members[i].guard.ema, members[i].guard.best_ema
            guard.roll_back(member, trainer_index)
            member.last_event = f"rollback @r{state.round}"
            del gradients[i]
            self.log(events.Rollback(state.round, i, ema=ema, best_ema=best_ema, outer_index=trainer_index))

    def run_round(self, state: RunState) -> None:
        results = self._run_units(state)
        gradients = absorb_results(state, results, self.config.estimator)
        if self.config.guard.rollback:
            self._guard(state, gradients)
        gradients, clipped = clip_outliers(gradients, self.config.estimator.outlier_clip)
        steps = apply_outer_steps(state.members, gradients, self.lopt, outer_settings(self.config))
        for i, step in steps.items():
            if not bool(step.accepted):
                self.log(events.Rejected(state.round, i, "the outer step would have made θ or its state non-finite; "
                                                         "θ kept"))
        state.round += 1
        members = state.members
        self.log(events.Round(
            round=state.round, elapsed=self.run_time(),
            meta_loss=_floats(m.meta_loss for m in members),
            outer_index=tuple(m.outer_index for m in members),
            truncation=tuple(m.truncation for m in members),
            steps=tuple(m.steps for m in members),
            age=tuple(m.steps - m.last_exploit_step for m in members),
            meta_loss_ema=_floats(m.guard.ema for m in members),
            outer_steps=len(steps),
            rejected=int(sum(not bool(s.accepted) for s in steps.values())),
            shortened=int(sum(bool(s.shortened) for s in steps.values())),
            step_scale=_floats(m.step_scale for m in members),
            step_ratio=float(np.median([float(s.step_ratio) for s in steps.values()])) if steps else None,
            step_ratios=_floats(steps[i].step_ratio if i in steps else np.nan for i in range(len(members))),
            estimate_norms=_floats(steps[i].gradient_norm if i in steps else np.nan for i in range(len(members))),
            estimates=sum(len(gradients[i]) for i in steps),
            clipped_estimates=clipped,
            replaced_tasks=int(sum(r.replaced for r in results)),
            replaced_by_member=tuple(sum(r.replaced for r in results if r.member == i) for i in range(len(members))),
            failed_units=sum(len(m.slots) for m in members) - len(results),
            inner_steps=state.inner_steps,
            worker_restarts=self.farm.stats.restarts,
            compile_seconds=self.compile_seconds(),
        ))

    def pbt(self, state: RunState) -> None:
        """One PBT tournament (``selfloop.master.pbt``)."""
        families = len(self.config.tasks.families)
        if self.config.pbt.task_allocation == "spread" and (state.family_spread is None
                                                            or len(state.family_spread.total) != families):
            state.family_spread = FamilySpread.unseen(families)  # new, or the run's families changed
        try:
            event, state.champion = tournament(state.members, self.farm.map, self.config, state.pbt_rng,
                                               state.pbt_events, state.round, state.champion, state.family_spread)
            reason = "no finite member in the pair"
        except ScoringFailed as error:
            event, reason = None, str(error)[-2000:]
        state.pbt_events += 1
        self.mark("pbt", state)
        if event is None:
            self.log(events.TournamentSkipped(state.round, reason))
        else:
            self.log(dataclasses.replace(event, elapsed=self.run_time()))

    def checkpoint(self, state: RunState) -> None:
        """Write a checkpoint now (crash-safe) and log how long it took."""
        write_started = time.time()
        self.log.show(events.Phase(f"writing checkpoint-{state.round:09d}.h5"))  # the screen only
        state.elapsed = write_started - self.started
        self.mark("checkpoint", state, at=state.elapsed)
        path = write_checkpoint(self.run_dir, state, self.config)
        prune(self.run_dir, self.config.checkpoint.keep)
        self.log(events.Checkpoint(state.round, state.elapsed, path.name, seconds=time.time() - write_started,
                                   bytes=path.stat().st_size))

    def train(self, state: RunState, max_rounds: int = 0) -> events.Eval | None:
        """Run until the session's time budget, the run's ``max_rounds`` or a
        stop request; returns the final evaluation (None if it failed or was cut). Each round ends at a consistent
        state (units absorbed, outer steps applied, PBT done), and only there is
        a checkpoint written; a phase the session must end in (a stop request,
        the hard time limit) is cut short and its work dropped, so the state
        stays the last consistent one, which is then checkpointed.

        Run time counts from the first evaluation of the random population and
        continues across resumes; the Adam reference (``prepare``) comes before.
        """
        session = self.session
        self.started = time.time() - state.elapsed
        last = None
        try:
            if state.resumed_from is None and state.round == 0:
                self.evaluate(state)
                state.last_pbt_time = state.last_eval_time
            while not (max_rounds > 0 and state.round >= max_rounds):
                self.run_round(state)
                self.run_if_due("pbt", state)
                if session.out_of_time() or session.stop.requested or (max_rounds > 0 and state.round >= max_rounds):
                    break
                # The checkpoint before the evaluation, which can take long (the paper's: 100 tasks
                # x 10k steps); an evaluation lost to a crash is simply due again after the resume.
                for job in ("checkpoint", "eval"):
                    self.run_if_due(job, state)
            last = self.evaluate(state)
        except Interrupted:
            self.log(events.Progress(f"{session.reason}: cut the running phase at round {state.round}; keeping "
                                     "the state it started from"))
        self.checkpoint(state)
        self.end(state, self.run_time(), session.reason, last)
        return last

    def end(self, state: RunState, elapsed: float, reason: str, last: events.Eval | None = None) -> None:
        """Log the session's end: why, and the best held-out loss at its start and at ``last`` (a
        session cut before its final evaluation reports its members' newest scores)."""
        best, fixed, tuned = (last.best, last.adam_best_fixed, last.adam_tuned) if last else self._newest_scores(state)
        self.log(events.End(state.round, elapsed, reason, start_best=state.first_best, end_best=best,
                            adam_best_fixed=fixed, adam_tuned=tuned))

    def _newest_scores(self, state: RunState) -> tuple[float, float, float]:
        """The members' newest best held-out score, Adam's best fixed rate and tuned
        (NaN where there are none yet)."""
        newest = [m.history[-1] for m in state.members if m.history]
        if not newest or self.reference is None:
            return math.nan, math.nan, math.nan
        fixed, tuned = self.reference.summary
        return min(newest), float(np.min(fixed)), float(tuned)
