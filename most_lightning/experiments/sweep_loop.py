"""Ask-and-tell sweep worker with the Optuna storage as the single source of truth.

Every worker (the sweeper process, its n_jobs-1 forked helpers, or sweeps started on other machines against the
same storage) loops: re-queue trials whose worker died -> ask (takes a re-queued WAITING trial first, else samples
a new one) -> run the job -> tell COMPLETE / PRUNED / FAIL with the reason. Optuna's storages hand each trial to
exactly one worker, so no point runs twice; a killed sweep leaves its RUNNING trial behind, which the next worker
marks FAIL ("interrupted") and re-queues with the same parameters.

A worker that died is recognised at once when it ran on this host and its process is gone, else by its heartbeat
(a trial system attribute refreshed every heartbeat_interval s) growing older than grace_period.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from most_lightning.experiments.search_space import Param, suggest, to_overrides
from most_lightning.experiments.trial_link import TrialLink

log = logging.getLogger(__name__)

WORKER_ATTR = "most_sweeper:worker"        # {"host", "pid"}
HEARTBEAT_ATTR = "most_sweeper:heartbeat"  # unix time of the last heartbeat
INTERRUPTED_ATTR = "most_sweeper:interrupted"  # set on a trial failed because its worker died (not budgeted)
FAIL_REASON = "fail_reason"  # user attr on every FAILED trial
REQUEUED_FROM = "requeued_from"  # user attr on a re-queued trial: the interrupted trial's number
OUTPUT_DIR = "output_dir"  # user attr: the job's run directory
DUPLICATE_OF = "duplicate_of"  # user attr: the finished trial whose result was reused (deduplicate)


@dataclass
class Outcome:
    """What a job gave back: values (COMPLETE), pruned, or a failure reason; output_dir if known."""

    values: list[float] | None = None
    pruned: bool = False
    reason: str | None = None
    output_dir: str | None = None


@dataclass
class WorkerSettings:
    n_trials: int
    directions: list[str]
    search_space: list[Param]
    fixed_overrides: list[str] = field(default_factory=list)
    storage_url: str | None = None
    heartbeat_interval: float = 10.0
    grace_period: float = 60.0
    poll_interval: float = 2.0
    deduplicate: bool = True


Launch = Callable[[list[str], int], Outcome]           # (overrides, trial number) -> outcome
Validate = Callable[[list[str]], str | None]           # overrides -> reason the point is invalid, or None


def outcome_from_return(value: Any, n_objectives: int) -> Outcome:
    """The task function's return value -> values, or a failure naming what is wrong with it."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if value is None:
        return Outcome(reason="the job returned no value: is optimized_metric set and logged?")
    if len(values) != n_objectives:
        return Outcome(reason=f"the job returned {len(values)} value(s) {values} for {n_objectives} direction(s)")
    out = []
    for i, v in enumerate(values):
        missing = getattr(v, "reason", None)  # run.py's MissingObjective: NaN with the reason the run gave
        if missing:
            return Outcome(reason=f"objective {i} is missing: {missing}")
        try:
            v = float(v)
        except (TypeError, ValueError):
            return Outcome(reason=f"objective {i} is not a number: {v!r}")
        if not math.isfinite(v):
            return Outcome(reason=f"objective {i} is {v} (not finite)")
        out.append(v)
    return Outcome(values=out)


def outcome_from_exception(err: BaseException) -> Outcome:
    import optuna

    if isinstance(err, optuna.TrialPruned):
        return Outcome(pruned=True, reason=str(err) or "pruned")
    return Outcome(reason=f"{type(err).__name__}: {err}")


def _alive_here(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_dead(trial, now: float, grace_period: float) -> bool:
    """A RUNNING trial whose worker is gone: same host and no such process, or no heartbeat for grace_period."""
    worker = trial.system_attrs.get(WORKER_ATTR)
    if worker and worker.get("host") == socket.gethostname():  # on this host the process table is the truth
        return worker.get("pid") != os.getpid() and not _alive_here(int(worker["pid"]))
    beat = trial.system_attrs.get(HEARTBEAT_ATTR)
    if beat is None:
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return now - started > grace_period
    return now - float(beat) > grace_period


def requeue_dead_trials(study, storage, grace_period: float) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker died and enqueue their parameters again; returns their numbers.
    Of several workers doing this at once, only the one whose state change wins re-queues."""
    import optuna
    from optuna.trial import TrialState

    if storage is None:
        return []
    now = time.time()
    requeued = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_dead(trial, now, grace_period):
            continue
        worker = trial.system_attrs.get(WORKER_ATTR) or {}
        reason = (f"interrupted: worker pid {worker.get('pid', '?')} on {worker.get('host', '?')} stopped while the "
                  "trial ran; re-queued with the same parameters")
        try:
            storage.set_trial_user_attr(trial._trial_id, FAIL_REASON, reason)
            storage.set_trial_system_attr(trial._trial_id, INTERRUPTED_ATTR, True)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        study.enqueue_trial(trial.params, user_attrs={REQUEUED_FROM: trial.number})
        log.warning(f"trial {trial.number}: {reason}")
        requeued.append(trial.number)
    return requeued


def budget_used(trials: Sequence) -> int:
    """Trials that count toward n_trials: all but those failed because their worker died (re-queued instead)."""
    from optuna.trial import TrialState

    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.system_attrs.get(INTERRUPTED_ATTR)))


class Heartbeat:
    """Refresh the trial's heartbeat attribute in a background thread while the job runs."""

    def __init__(self, storage, trial_id: int, interval: float) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{trial_id}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            except Exception as err:  # noqa: BLE001 - a finished trial or a busy database: try again later
                log.debug(f"heartbeat of trial {self.trial_id} skipped: {err}")

    def __enter__(self) -> "Heartbeat":
        if self.storage is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def run_worker(study, storage, settings: WorkerSettings, launch: Launch, validate: Validate | None = None,
               should_stop: Callable[[], bool] = lambda: False) -> int:
    """Run trials until the study holds n_trials budgeted trials and none is left running; returns how many
    trials this worker finished."""
    from optuna.trial import TrialState

    done = 0
    while not should_stop():
        requeue_dead_trials(study, storage, settings.grace_period)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if budget_used(trials) >= settings.n_trials and not waiting:
            if storage is not None and any(t.state == TrialState.RUNNING for t in trials):
                time.sleep(settings.poll_interval)  # others still run: wait, their trial may need a retry
                continue
            break
        trial = study.ask()
        run_trial(study, storage, trial, settings, launch, validate)
        done += 1
    return done


def find_twin(study, trial, params: dict[str, Any]):
    """A COMPLETE or PRUNED trial with exactly these parameters (deterministic objectives repeat exactly)."""
    from optuna.trial import TrialState

    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if other.number != trial.number and other.params == params:
            return other
    return None


def run_trial(study, storage, trial, settings: WorkerSettings, launch: Launch, validate: Validate | None) -> Outcome:
    from optuna.trial import TrialState

    if storage is not None:
        storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid()})
        storage.set_trial_system_attr(trial._trial_id, HEARTBEAT_ATTR, time.time())
    with Heartbeat(storage, trial._trial_id, settings.heartbeat_interval):
        try:
            params = suggest(trial, settings.search_space)
            overrides = [*settings.fixed_overrides, *to_overrides(params)]
            reason = validate(overrides) if validate is not None else None
        except Exception as err:  # noqa: BLE001 - a point that cannot even be composed is a failed trial
            params, overrides, reason = trial.params, [], f"{type(err).__name__}: {err}"
        twin = find_twin(study, trial, params) if settings.deduplicate and reason is None else None
        if reason is not None:
            outcome = Outcome(reason=f"invalid point {params}: {reason}")
        elif twin is not None:  # the sampler proposed a finished point again: reuse it, do not rerun
            trial.set_user_attr(DUPLICATE_OF, twin.number)
            outcome = (Outcome(values=list(twin.values)) if twin.state == TrialState.COMPLETE else
                       Outcome(pruned=True, reason=f"same parameters as pruned trial {twin.number}"))
            log.info(f"trial {trial.number}: same parameters as trial {twin.number}, not run again")
        else:
            link = TrialLink(study.study_name, settings.storage_url, trial._trial_id, trial.number)
            log.info(f"trial {trial.number}: {' '.join(to_overrides(params))}")
            outcome = launch([*overrides, *link.overrides()], trial.number)
    if outcome.output_dir:
        trial.set_user_attr(OUTPUT_DIR, outcome.output_dir)
    if outcome.values is not None:
        study.tell(trial, outcome.values)
        log.info(f"trial {trial.number} finished: {outcome.values}")
    elif outcome.pruned:
        trial.set_user_attr("pruned_reason", outcome.reason)
        study.tell(trial, state=TrialState.PRUNED)
        log.info(f"trial {trial.number} pruned: {outcome.reason}")
    else:
        trial.set_user_attr(FAIL_REASON, outcome.reason)
        study.tell(trial, state=TrialState.FAIL)
        log.warning(f"trial {trial.number} FAILED: {outcome.reason}")
    return outcome
