"""Structured config of the sweeper, registered as hydra/sweeper=most_optuna.

No `from __future__ import annotations` here: Hydra executes plugin modules before adding them to sys.modules,
and dataclasses then fail to resolve string annotations."""


from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class MostOptunaSweeperConf:
    _target_: str = "hydra_plugins.most_optuna_sweeper.sweeper.MostOptunaSweeper"
    # the study: created on first use, resumed afterwards (same name + storage)
    study_name: Optional[str] = None
    # null (in memory, nothing survives), sqlite:///path.db, journal:///path.log or another RDB URL
    storage: Optional[str] = None
    # one per objective; the task returns one value per direction (optimized_metric may be a list)
    directions: List[str] = field(default_factory=lambda: ["minimize"])
    # trials the study should hold in the end (resuming runs only the missing ones)
    n_trials: int = 20
    # worker processes on this machine (forked at start; they share the storage)
    n_jobs: int = 1
    # {name: tpe|cmaes|gp|random|qmc|nsgaii, seed: int, kwargs: {...}}
    sampler: Dict[str, Any] = field(default_factory=lambda: {"name": "tpe", "seed": None, "kwargs": {}})
    # {name: none|median|hyperband|percentile|successive_halving, kwargs: {...}}
    pruner: Dict[str, Any] = field(default_factory=lambda: {"name": "none", "kwargs": {}})
    # key -> {type: float|int|categorical, low, high, step, log, choices, when}
    search_space: Dict[str, Any] = field(default_factory=dict)
    # fixed overrides for every trial (key: value), like the basic sweeper's params
    params: Dict[str, Any] = field(default_factory=dict)
    # dotted path of f(job_config) that raises for an invalid point: checked before the study (fails if the
    # whole space is invalid) and before each trial (the trial is recorded FAILED with the reason)
    validate: Optional[str] = None
    # dead-worker detection for re-queueing interrupted trials
    heartbeat_interval: float = 10.0
    grace_period: float = 60.0
    # a point equal to a finished trial's (same parameters) reuses its result instead of running again; set false
    # for noisy objectives where repeats are wanted
    deduplicate: bool = True


ConfigStore.instance().store(group="hydra/sweeper", name="most_optuna", node=MostOptunaSweeperConf,
                             provider="most_lightning")
