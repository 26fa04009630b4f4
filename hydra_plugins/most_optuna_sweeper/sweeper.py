"""The Hydra side of the sweeper: validate the settings and the search space against the composed config,
open (or resume) the study, fork n_jobs-1 workers, and run trials through Hydra's launcher.

The Optuna logic lives in most_lightning.experiments (search_space, optuna_setup, sweep_loop); this class only
turns trials into Hydra jobs and job returns into outcomes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.most_optuna_sweeper import config as _config  # noqa: F401 - registers hydra/sweeper=most_optuna

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


class MostOptunaSweeper(Sweeper):
    def __init__(self, study_name: Optional[str] = None, storage: Optional[str] = None,
                 directions: Any = ("minimize",), n_trials: int = 20, n_jobs: int = 1, sampler: Any = None,
                 pruner: Any = None, search_space: Any = None, params: Any = None, validate: Optional[str] = None,
                 heartbeat_interval: float = 10.0, grace_period: float = 60.0, deduplicate: bool = True) -> None:
        self.study_name = study_name
        self.storage_url = storage
        self.directions = _plain(directions)
        self.n_trials = int(n_trials)
        self.n_jobs = int(n_jobs)
        self.sampler_spec = _plain(sampler)
        self.pruner_spec = _plain(pruner)
        self.search_space_spec = _plain(search_space) or {}
        self.params = _plain(params) or {}
        self.validate_path = validate
        self.heartbeat_interval = float(heartbeat_interval)
        self.grace_period = float(grace_period)
        self.deduplicate = bool(deduplicate)
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # ---- checks before the study ------------------------------------------------------------------------------
    def _fixed_overrides(self, arguments: List[str]) -> List[str]:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from most_lightning.experiments.search_space import format_value

        fixed = [f"{k}={format_value(v)}" for k, v in self.params.items()]
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        for override in parser.parse_overrides(arguments):
            if override.is_sweep_override():
                raise ValueError(
                    f"`{override.input_line}` is a sweep over values; with hydra/sweeper=most_optuna declare it in "
                    "hydra.sweeper.search_space (e.g. {type: categorical, choices: [...]}) instead")
        return [*fixed, *arguments]

    def _compose(self, overrides: List[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

    def _validator(self):
        if not self.validate_path:
            return None
        from hydra.utils import get_method

        check = get_method(self.validate_path)

        def validate(overrides: List[str]) -> Optional[str]:
            cfg = self._compose(overrides)  # a key the config lacks raises here, naming it
            try:
                check(cfg)
            except Exception as err:  # noqa: BLE001 - the validator's own error is the reason
                return f"{type(err).__name__}: {err}"
            return None

        return validate

    def _check_space(self, space, fixed: List[str]) -> None:
        """Every key must exist in the config (composition fails otherwise); if a validator is set, at least one
        probe point must pass it, else the whole space is impossible and no study is started."""
        from hydra.errors import ConfigCompositionException

        from most_lightning.experiments.search_space import probe_points, to_overrides
        from most_lightning.experiments.optuna_setup import SweeperConfigError

        points = probe_points(space)
        validate = self._validator()
        reasons = []
        for point in points:
            try:
                cfg = self._compose([*fixed, *to_overrides(point)])
            except ConfigCompositionException as err:
                raise SweeperConfigError(
                    f"hydra.sweeper.search_space: the point {point} does not compose: {err} "
                    f"(cause: {err.__cause__}). Every search_space key must name a config field or group that "
                    "exists; add new fields with a leading '+' or '++'.") from err
            if validate is not None:
                reason = validate([*fixed, *to_overrides(point)])
                if reason is not None:
                    reasons.append((point, reason))
        if validate is not None and len(reasons) == len(points):
            raise SweeperConfigError(
                f"hydra.sweeper.search_space is impossible: all {len(points)} probe points fail "
                f"{self.validate_path}; e.g. {reasons[0][0]}: {reasons[0][1]}")
        if reasons:
            log.warning(f"{len(reasons)} of {len(points)} probe points of the search space are invalid (e.g. "
                        f"{reasons[0][0]}: {reasons[0][1]}); trials that land there are recorded FAILED")

    # ---- the sweep -----------------------------------------------------------------------------------------------
    def sweep(self, arguments: List[str]) -> Any:
        import optuna

        from most_lightning.experiments.optuna_setup import (
            SweeperConfigError, check_directions, make_pruner, make_sampler, make_storage)
        from most_lightning.experiments.search_space import parse_search_space
        from most_lightning.experiments.sweep_loop import WorkerSettings
        from most_lightning.experiments.trial_link import SWEEPER_ATTR, register_in_process

        directions = check_directions(self.directions)
        self.n_objectives = len(directions)
        space = parse_search_space(self.search_space_spec)
        if not space:
            raise SweeperConfigError("hydra.sweeper.search_space is empty: declare at least one parameter")
        if self.n_trials < 1 or self.n_jobs < 1:
            raise SweeperConfigError(f"hydra.sweeper.n_trials={self.n_trials} and n_jobs={self.n_jobs} must be >= 1")
        fixed = self._fixed_overrides(arguments)
        make_sampler(self.sampler_spec, len(directions))  # fail on a bad sampler/pruner before any trial
        make_pruner(self.pruner_spec, len(directions))
        self._check_space(space, fixed)

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        storage_url = self.storage_url
        if storage_url is None and self.n_jobs > 1:  # workers in several processes need a shared storage
            storage_url = f"journal:///{(sweep_dir / 'optuna_journal.log').resolve()}".replace("////", "///")
            log.info(f"n_jobs={self.n_jobs} without storage: using {storage_url}")
        study_name = self.study_name or f"most_{self.config.task_name}"
        self._storage_used = storage_url
        storage = make_storage(storage_url)
        # a fixed seed is used as given by the first worker of a new study (reproducible single-worker sweeps);
        # every other worker (forked, or joining/resuming a study that has trials) shifts it, or all of them
        # would propose the same points
        known = optuna.study.get_all_study_names(storage) if storage is not None else []
        fresh = study_name not in known or not optuna.load_study(study_name=study_name, storage=storage).trials
        self._seed_base = 0 if fresh else 7919 * os.getpid()
        study = optuna.create_study(study_name=study_name, storage=storage, directions=directions,
                                    sampler=make_sampler(self.sampler_spec, len(directions), self._seed_base),
                                    pruner=make_pruner(self.pruner_spec, len(directions)), load_if_exists=True)
        if list(d.name.lower() for d in study.directions) != directions:
            raise SweeperConfigError(f"study {study_name!r} in {storage_url} has directions "
                                     f"{[d.name.lower() for d in study.directions]}, the yaml asks for {directions}: "
                                     "use another study_name")
        spec = {"directions": directions, "sampler": self.sampler_spec, "pruner": self.pruner_spec,
                "search_space": self.search_space_spec}
        old = study.user_attrs.get(SWEEPER_ATTR)
        if old is not None and old.get("search_space") != self.search_space_spec:
            log.warning(f"study {study_name!r} was started with another search space; resuming it anyway")
        study.set_user_attr(SWEEPER_ATTR, spec)
        # jobs in this process report to this study object (an in-memory study has no storage to reopen)
        register_in_process(study, storage if storage is not None else study._storage)
        settings = WorkerSettings(n_trials=self.n_trials, directions=directions, search_space=space,
                                  fixed_overrides=fixed, storage_url=storage_url,
                                  heartbeat_interval=self.heartbeat_interval, grace_period=self.grace_period,
                                  deduplicate=self.deduplicate)
        n_before = len(study.trials)
        log.info(f"study {study_name!r} ({storage_url or 'in memory'}): {n_before} trials so far, target "
                 f"{self.n_trials}, {self.n_jobs} worker(s), sweep dir {sweep_dir}")
        children = self._fork_workers(study_name, storage_url, settings) if self.n_jobs > 1 else []
        # (each child shifts the seed by its index, see _child_main)
        from most_lightning.experiments.sweep_loop import run_worker

        run_worker(study, storage, settings, self._launch, self._validator())
        failed_children = []
        for child in children:
            child.join()
            if child.exitcode != 0:
                failed_children.append((child.pid, child.exitcode))
        if failed_children:
            log.warning(f"worker processes ended badly (pid, exit code): {failed_children}; their trials are "
                        "marked FAIL/re-queued by the next sweep")
        return self._report(study, sweep_dir)

    def _fork_workers(self, study_name: str, storage_url: str, settings) -> list:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")  # before any job ran: no OpenMP/torch state to inherit
        children = []
        for i in range(1, self.n_jobs):
            child = ctx.Process(target=self._child_main, args=(study_name, storage_url, settings, i),
                                name=f"most_optuna_worker_{i}")
            child.start()
            children.append(child)
        return children

    def _child_main(self, study_name: str, storage_url: str, settings, index: int) -> None:
        import optuna

        from most_lightning.experiments.optuna_setup import make_pruner, make_sampler, make_storage
        from most_lightning.experiments.sweep_loop import run_worker
        from most_lightning.experiments.trial_link import register_in_process

        storage = make_storage(storage_url)  # own connection: database handles do not survive a fork
        study = optuna.load_study(study_name=study_name, storage=storage,
                                  sampler=make_sampler(self.sampler_spec, len(settings.directions),
                                                       self._seed_base + 104729 * index),
                                  pruner=make_pruner(self.pruner_spec, len(settings.directions)))
        register_in_process(study, storage)
        run_worker(study, storage, settings, self._launch, self._validator())

    def _launch(self, overrides: List[str], number: int):
        from hydra.core.utils import JobStatus

        from most_lightning.experiments.sweep_loop import Outcome, outcome_from_exception, outcome_from_return

        try:
            (ret,) = self.launcher.launch([overrides], initial_job_idx=number)
        except Exception as err:  # noqa: BLE001 - a launcher failure fails this trial, not the sweep
            return outcome_from_exception(err)
        output_dir = None
        try:
            output_dir = str(ret.hydra_cfg.hydra.runtime.output_dir)
        except Exception:  # noqa: BLE001 - not every launcher returns the job's hydra config
            pass
        if ret.status == JobStatus.COMPLETED:
            outcome = outcome_from_return(ret.return_value, self.n_objectives)
        else:
            outcome = outcome_from_exception(ret._return_value)
        outcome.output_dir = output_dir
        return outcome

    def _report(self, study, sweep_dir: Path) -> Any:
        from optuna.trial import TrialState

        from most_lightning.experiments.sweep_loop import FAIL_REASON

        states = {s.name: 0 for s in TrialState}
        for t in study.trials:
            states[t.state.name] += 1
        summary: dict[str, Any] = {"study_name": study.study_name, "storage": self._storage_used,
                                   "trials": {k: v for k, v in states.items() if v}}
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        if complete:
            if len(study.directions) == 1:
                best = study.best_trial
                summary["best"] = {"number": best.number, "value": best.value, "params": best.params}
            else:
                summary["pareto_front"] = [{"number": t.number, "values": t.values, "params": t.params}
                                           for t in study.best_trials]
        failed = {t.number: t.user_attrs.get(FAIL_REASON) for t in study.trials if t.state == TrialState.FAIL}
        if failed:
            summary["failed"] = failed
        OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optimization_results.yaml")
        log.info(f"study {study.study_name!r}: {summary['trials']}; results in {sweep_dir / 'optimization_results.yaml'}")
        if not complete and not states["PRUNED"]:
            raise RuntimeError(f"no trial of study {study.study_name!r} completed; failures: {failed}")
        return summary
