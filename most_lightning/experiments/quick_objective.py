"""A known function of the run's overrides in place of training, to test sweeps in seconds (`quick_objective:`
in the run config; run.py calls this instead of train()).

    quick_objective:
      metrics:                       # metric name -> {config key: target}; value = sum of squared distances
        quick/dist: {model.audio_expert_fraction: 0.375, lit.optimizer.lr: 0.003}
      scale: {lit.optimizer.lr: 0.001}   # optional per-key divisor of the distance
      steps: 4                       # intermediate values of optimized_metric reported to the trial (pruning)
      sleep_s: 0.0                   # wall time per step (kill-and-resume tests)
      fail_when: {model.top_k: [3, 3]}   # raise if every named key lies in [lo, hi]
      nan_when: null                 # return NaN for every metric if every named key lies in [lo, hi]
      drop_when: null                # log no metric at all there (a run that never logged its objective)

The model/router config is validated as in a real run, so an impossible expert split fails the same way.
Writes metrics.json, config_resolved.yaml and provenance.json like a real run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class QuickObjectiveFailure(RuntimeError):
    """The failure quick_objective.fail_when asks for (tests that a failing trial does not stop a sweep)."""


def _value(cfg: DictConfig, key: str) -> float:
    value = OmegaConf.select(cfg, key.lstrip("+"), default=None)
    if value is None:
        raise KeyError(f"quick_objective names {key!r}, which the run config lacks")
    return float(value)


def _inside(cfg: DictConfig, ranges: Mapping | None) -> bool:
    return bool(ranges) and all(lo <= _value(cfg, key) <= hi for key, (lo, hi) in ranges.items())


def quick_metrics(cfg: DictConfig) -> dict[str, float]:
    spec = cfg.quick_objective
    scale = spec.get("scale") or {}
    return {name: sum(((_value(cfg, key) - float(target)) / float(scale.get(key, 1.0))) ** 2
                      for key, target in targets.items())
            for name, targets in spec.metrics.items()}


def run_quick_objective(cfg: DictConfig) -> dict[str, float]:
    from most_lightning.experiments.provenance import write_run_records
    from most_lightning.model.config_groups import build_model_config

    build_model_config(cfg.model, cfg.router, vocab_size=None)  # same start-up check as a real run
    spec = cfg.quick_objective
    if _inside(cfg, spec.get("fail_when")):
        raise QuickObjectiveFailure(f"quick_objective.fail_when {dict(spec.fail_when)} matched this point")
    metrics = quick_metrics(cfg)
    if _inside(cfg, spec.get("nan_when")):
        metrics = {name: float("nan") for name in metrics}
    if _inside(cfg, spec.get("drop_when")):
        metrics = {}
    reporter = None
    if cfg.get("optuna_trial"):
        from most_lightning.experiments.trial_link import TrialLink, TrialReporter

        reporter = TrialReporter(TrialLink.from_config(cfg.optuna_trial))
    target = cfg.get("optimized_metric")
    first = target if isinstance(target, str) and target in metrics else next(iter(metrics), None)
    steps = int(spec.get("steps", 0) or 0) if first is not None else 0
    for step in range(1, steps + 1):
        time.sleep(float(spec.get("sleep_s", 0.0) or 0.0))
        if reporter is not None:  # a curve that falls to the final value: worse points stay worse
            reporter.report(metrics[first] * (1.0 + (steps - step) / steps), step)
            if reporter.should_prune():
                import optuna

                raise optuna.TrialPruned(f"pruned at step {step} of the quick objective")
    write_run_records(Path(cfg.paths.output_dir), cfg, metrics)
    return metrics
