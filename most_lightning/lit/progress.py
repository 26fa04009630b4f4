"""Lightning's rich progress bar, with a training description that suits step-based runs."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepRunProgressBar(RichProgressBar):
    """RichProgressBar that prints "Epoch 3" rather than "Epoch 3/-2" when the number of epochs is unbounded.

    Our trainers stop at ``max_steps`` and leave epochs open (``max_epochs: -1``; Lightning also turns a null
    max_epochs into -1 when max_steps is set), and Lightning's bar prints ``max_epochs - 1`` after the epoch.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        # as Lightning does: pad to the validation description's width, so the bars do not flicker
        return f"{description:{len(self.validation_description)}}"
