"""Helpers for run.py: instantiate callbacks/loggers from Hydra config, pick test weights, write metrics."""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf


def route_lightning_logs_through_root() -> None:
    """`import lightning` gives the "lightning" logger its own console handler and lets records propagate too,
    so under Hydra (which configures the root logger: console + run.log) every line shows twice. Drop
    Lightning's console handler when the root logger already has handlers: one copy, and it reaches run.log."""
    if not logging.getLogger().handlers:
        return
    lightning_logger = logging.getLogger("lightning")
    for handler in list(lightning_logger.handlers):
        if type(handler) is logging.StreamHandler:
            lightning_logger.removeHandler(handler)


# Third-party messages a user cannot act on, matched narrowly (message and emitting module): (message regex,
# category, module regex). LeafSpec: Lightning's own use of a torch API that torch deprecated. IterableDataset
# __len__: Lightning's caution about workers that all read the same data; our streams split shards and samples
# over ranks and workers themselves (data/pipeline.py), so the length they report is each worker's.
KNOWN_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    (r"Your `IterableDataset` has `__len__` defined", UserWarning, r"lightning\.pytorch\.utilities\.data"),
)
# Log records of Lightning's rank-zero logger: advertisements for Lightning's cloud services, and the note that our
# own model summary callback replaces Lightning's default one.
KNOWN_LOG_LINES = (
    r"💡 Tip: .*\[litlogger\]",
    r"💡 Tip: .*\[litmodels\]",
    r"Trainer already configured with model summary callbacks: \[<class 'most_lightning\.",
)
RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _DropKnownLines(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def quiet_known_third_party_noise() -> None:
    """Filter the known third-party warnings and log lines above (idempotent)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    logger = logging.getLogger(RANK_ZERO_LOGGER)
    if not any(isinstance(f, _DropKnownLines) for f in logger.filters):
        logger.addFilter(_DropKnownLines(KNOWN_LOG_LINES))


def _instantiate_group(group: DictConfig | None, kind: str) -> list[Any]:
    objects: list[Any] = []
    if not group:
        return objects
    if not isinstance(group, DictConfig):
        raise TypeError(f"the {kind} config must be a mapping of name -> {{_target_: ...}}, got {type(group)}")
    for name, conf in group.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            objects.append(instantiate(conf))
        elif conf is not None:
            raise TypeError(f"{kind}.{name} has no _target_; every {kind} entry must name a class to build")
    return objects


def instantiate_callbacks(cfg: DictConfig | None, have_loggers: bool = True) -> list[Callback]:
    """The callbacks group, plus ValidateAtEnd (whatever the group holds: the objective must exist for any
    max_steps)."""
    from .final_validation import ValidateAtEnd

    callbacks = _instantiate_group(cfg, "callbacks")
    if not have_loggers:  # LearningRateMonitor refuses to run without a logger (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not any(isinstance(c, ValidateAtEnd) for c in callbacks):
        callbacks.append(ValidateAtEnd())
    return callbacks


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return _instantiate_group(cfg, "logger")


def checkpoint_for_test(trainer: Trainer, weights: str) -> str | None:
    """Checkpoint path for trainer.test: "best" (falls back to last), "last", or "current" (None = in memory).

    "best" is the checkpoint written at the end of the validation with the best monitored value (lowest val/nll),
    holding the weights that validation measured: conf/callbacks/model_checkpoint.yaml's ValidatedCheckpoint
    ranks only at validation ends, also with every_n_train_steps (most_lightning/lit/checkpointing.py)."""
    if weights not in ("best", "last", "current"):
        raise ValueError(f"test_weights={weights!r}: allowed values are 'best', 'last', 'current'")
    callback = trainer.checkpoint_callback
    if weights == "current" or callback is None:
        return None
    if weights == "best" and getattr(callback, "best_model_path", ""):
        return callback.best_model_path
    last = getattr(callback, "last_model_path", "")
    return last or None


def best_checkpoint_metrics(trainer: Trainer) -> dict[str, float]:
    """{"<monitor>_best": score} of the checkpoint callback (the weights "best" testing uses), if any."""
    callback = trainer.checkpoint_callback
    score = getattr(callback, "best_model_score", None)
    monitor = getattr(callback, "monitor", None)
    if score is None or not monitor:
        return {}
    return {f"{monitor}_best": float(score)}


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flat {name: float} from Lightning's callback_metrics (0-d tensors) or plain numbers."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return dict(sorted(out.items()))


def write_json(path: str | Path, payload: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # JSON has no NaN/inf: write them as null so the file stays standard
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(payload), indent=2) + "\n")
    return path


def optimized_metric(metrics: Mapping[str, float], name: str | None) -> float | None:
    if not name:
        return None
    if name not in metrics:
        raise KeyError(
            f"optimized_metric={name!r} was not logged; logged metrics are: {sorted(metrics)}. "
            "Set optimized_metric to one of them (e.g. val/nll)."
        )
    return metrics[name]


class MissingObjective(float):
    """NaN standing for an objective the run did not log, with the reason: a sweeper records the trial as FAILED
    with it (a float subclass, so launchers that pickle return values keep the reason)."""

    reason: str

    def __new__(cls, reason: str) -> "MissingObjective":
        value = super().__new__(cls, math.nan)
        value.reason = reason
        return value

    def __repr__(self) -> str:
        return f"MissingObjective({self.reason!r})"


def run_objective(metrics: Mapping[str, float], names: Any) -> float | list[float] | None:
    """What run.py returns to Hydra: the value of optimized_metric (a list for several objectives). A name the run
    did not log gives a MissingObjective (NaN) and a warning, never an exception, so a multirun goes on to its
    next cell and a sweeper records this trial as FAILED with the reason."""
    log = logging.getLogger("most_lightning.run")

    def one(name: str | None) -> float | None:
        try:
            return optimized_metric(metrics, name)
        except KeyError as err:
            reason = err.args[0]
            log.warning(f"{reason} The objective of this run is NaN.")
            return MissingObjective(reason)

    if isinstance(names, (list, tuple)) or OmegaConf.is_list(names):
        return [one(name) for name in names]
    return one(names)
