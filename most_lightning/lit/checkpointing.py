"""Which checkpoint is "best": the one whose weights were validated, never one scored with an older validation.

Lightning's ModelCheckpoint with `every_n_train_steps` (or `train_time_interval`) ranks the checkpoints it saves
between validations by the monitored value still in the trainer's metrics, which comes from the previous
validation: the checkpoint marked best then holds later weights than the ones that scored best. Here:

- the top-k ranking (and so `best_model_path`, what `test_weights=best` tests) happens only at the end of a
  validation, with the weights that validation measured, and at every validation;
- saves triggered by steps or time between validations write `last.ckpt` only (what a crashed run resumes from);
- a checkpoint is written under a temporary name and renamed when complete, so a run killed while saving
  (kill -9, a node lost) leaves the previous last.ckpt whole;
- every validation end also refreshes `last.ckpt` (Lightning writes it only when the top-k changed), so a run
  killed after a validation that did not improve resumes from there, not from the best step.

The rule, in one line: **best = the checkpoint written at the end of the validation with the best monitored value
(lowest val/nll by default)**. tests/test_checkpoint_selection.py checks it against the steps where each value
was measured.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint


class ValidatedCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ranking only ever uses a fresh validation score (see the module docstring)."""

    _between_validations = False

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._between_validations = True
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._between_validations = False
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if due and self.save_last and self._last_global_step_saved != trainer.global_step and self._may_save(trainer):
            # Lightning defers this save to the next validation while the monitored value is missing (before the
            # first validation) or at an epoch end: a crash before then would find no last.ckpt
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        if self._between_validations and self.monitor is not None:
            return  # the monitored value was measured on earlier weights: it cannot rank these
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.monitor is None or not self._may_save(trainer) or self._should_save_on_train_epoch_end(trainer):
            super().on_validation_end(trainer, pl_module)
            return
        # Lightning's own rule skips this when a step-triggered save already ran at this step, or waits for a
        # "deferred" save it set at an epoch end: rank here, at every validation (every_n_epochs permitting)
        candidates = self._monitor_candidates(trainer)
        if self.every_n_epochs < 1 or (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save_topk_checkpoint(trainer, candidates)
        self._defer_save_until_validation = False
        if self.save_last:  # last.ckpt with this validation's tracking in its state
            self._save_last_checkpoint(trainer, candidates)

    @staticmethod
    def _may_save(trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return not (trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        partial = f"{filepath}.partial"
        super()._save_checkpoint(trainer, partial)  # ends with a barrier: every rank has written its part
        if trainer.is_global_zero and os.path.exists(partial):
            if os.path.isdir(partial) and os.path.isdir(filepath):  # sharded (DeepSpeed) checkpoints are folders
                shutil.rmtree(filepath)
            os.replace(partial, filepath)
        trainer.strategy.barrier("ValidatedCheckpoint.rename")
        self._last_checkpoint_saved = filepath
