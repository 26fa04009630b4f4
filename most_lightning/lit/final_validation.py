"""Validate once more at the last training step when the last validation is older than that step.

Validation runs every `trainer.val_check_interval` steps, so a run whose `max_steps` is not a multiple of it (a
20-step smoke test of an ablation grid with validation every 50 steps) would end with no validation metrics at
all: no objective for a sweep (`val/nll`), and no "best" checkpoint. run.py adds this callback to every fit.

It asks Lightning for the extra pass the way early stopping does: `trainer.should_stop` set at the last step makes
the training loop validate before it stops, inside `fit`, so checkpoint callbacks see the result.
"""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn


class ValidateAtEnd(Callback):
    def __init__(self) -> None:
        self.last_validated_step: int | None = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.last_validated_step = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.enable_validation or self.last_validated_step == trainer.global_step:
            return
        if is_last_training_batch(trainer):
            # the loop validates after this batch, then stops (it would stop here anyway)
            trainer.should_stop = True


def is_last_training_batch(trainer: Trainer) -> bool:
    """The batch just trained is the fit's last: max_steps reached, or the last batch of the last epoch."""
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    return (max_epochs is not None and max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs
            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
