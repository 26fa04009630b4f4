"""The link from a training job back to its Optuna trial, so a Lightning callback can report intermediate values
and ask the pruner (most_lightning.lit.pruning.OptunaPruning).

The sweeper passes the link in the job's config (`optuna_trial: {study_name, storage, trial_id, number}`), so it
reaches the job whatever the launcher (same process, subprocess, another machine sharing the storage). A study
without storage (in memory) is found in this process's registry: only the basic (in-process) launcher can
report to it. The pruner is not kept in Optuna storage; the sweeper saves its spec as a study user attribute.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SWEEPER_ATTR = "most_sweeper"  # study user attr: {"directions", "sampler", "pruner", "search_space"}

_IN_PROCESS: dict[str, tuple[Any, Any]] = {}  # study name -> (study, storage) opened by a sweeper in this process


def register_in_process(study, storage) -> None:
    _IN_PROCESS[study.study_name] = (study, storage)


@dataclass
class TrialLink:
    study_name: str
    storage: str | None
    trial_id: int
    number: int

    @classmethod
    def from_config(cls, node: Mapping | None) -> "TrialLink | None":
        if not node:
            return None
        missing = [k for k in ("study_name", "trial_id") if node.get(k) is None]
        if missing:
            raise ValueError(f"optuna_trial lacks {missing}; the Optuna sweeper sets it for every trial")
        return cls(str(node["study_name"]), node.get("storage"), int(node["trial_id"]), int(node.get("number", -1)))

    def overrides(self) -> list[str]:
        """The job overrides that carry this link (read back by from_config)."""
        from most_lightning.experiments.search_space import format_value

        return [f"++optuna_trial.study_name={format_value(self.study_name)}",
                f"++optuna_trial.storage={format_value(self.storage)}",
                f"++optuna_trial.trial_id={self.trial_id}", f"++optuna_trial.number={self.number}"]


class TrialReporter:
    """Report intermediate values of one trial and ask the study's pruner (what optuna.Trial.report and
    should_prune do, without rebuilding a Trial, which would re-run the sampler)."""

    def __init__(self, link: TrialLink) -> None:
        import optuna

        from most_lightning.experiments.optuna_setup import make_pruner, make_storage

        self.link = link
        if link.study_name in _IN_PROCESS:
            self.study, self.storage = _IN_PROCESS[link.study_name]
        elif link.storage is None:
            raise RuntimeError(
                f"optuna_trial: study {link.study_name!r} has no storage and was not started in this process; "
                "set hydra.sweeper.storage (sqlite:///... or journal:///...) so jobs in other processes can report")
        else:
            self.storage = make_storage(link.storage)
            spec = optuna.load_study(study_name=link.study_name, storage=self.storage).user_attrs.get(SWEEPER_ATTR, {})
            pruner = make_pruner(spec.get("pruner"), len(spec.get("directions", ["minimize"])))
            self.study = optuna.load_study(study_name=link.study_name, storage=self.storage, pruner=pruner)

    def report(self, value: float, step: int) -> None:
        value = float(value)
        self.storage.set_trial_intermediate_value(self.link.trial_id, int(step), value)

    def should_prune(self) -> bool:
        trial = self.storage.get_trial(self.link.trial_id)
        return bool(self.study.pruner.prune(self.study, trial))


def finite_or_none(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
