"""Optuna pruning from inside Lightning: report the monitored validation metric to the sweep's trial at every
validation (epoch- or step-based val_check_interval alike) and stop the fit when the pruner says so.

The trial is reached through the job's config (`optuna_trial`, set by hydra/sweeper=most_optuna), so this works
whatever process runs the job. run.py then raises optuna.TrialPruned (pruning_message) and the sweeper records
the trial PRUNED. Without `optuna_trial` (a plain run) the callback does nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


class OptunaPruning(Callback):
    def __init__(self, monitor: str = "val/nll", trial: Mapping | None = None) -> None:
        from most_lightning.experiments.trial_link import TrialLink

        self.monitor = monitor
        self.link = TrialLink.from_config(trial)
        self._reporter = None
        self.pruned_at: int | None = None
        self.pruned_value: float | None = None
        self.n_reports = 0

    @property
    def reporter(self):
        if self._reporter is None and self.link is not None:
            from most_lightning.experiments.trial_link import TrialReporter

            self._reporter = TrialReporter(self.link)
        return self._reporter

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.link is None or trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero:
            if self.monitor not in trainer.callback_metrics:
                raise KeyError(
                    f"OptunaPruning: monitor={self.monitor!r} was not logged at validation; logged metrics are "
                    f"{sorted(trainer.callback_metrics)}. Set callbacks.optuna_pruning.monitor to one of them.")
            value = float(trainer.callback_metrics[self.monitor])
            step = int(trainer.global_step)
            self.reporter.report(value, step)
            self.n_reports += 1
            prune = self.reporter.should_prune()
            if prune:
                self.pruned_at, self.pruned_value = step, value
        prune = trainer.strategy.broadcast(prune, src=0)  # every rank stops together
        if prune:
            if self.pruned_at is None:  # the other ranks
                self.pruned_at = int(trainer.global_step)
            trainer.should_stop = True
            rank_zero_info(f"Optuna pruner stopped trial {self.link.number} at step {trainer.global_step} "
                           f"({self.monitor}={self.pruned_value})")


def pruning_message(callbacks: Sequence[Any]) -> str | None:
    """The reason to raise optuna.TrialPruned after fit, if an OptunaPruning callback stopped it."""
    for callback in callbacks:
        if isinstance(callback, OptunaPruning) and callback.pruned_at is not None:
            return (f"pruned at step {callback.pruned_at}: {callback.monitor}={callback.pruned_value} "
                    f"(trial {callback.link.number})")
    return None
