"""Held-out ASR WER during training: the learning curve of the speech->text direction.

At the end of every ``every_n_validations``-th validation, greedy-decode ``limit`` utterances of the
validation split and log ``val/asr_wer`` and ``val/asr_cer``; with ``mismatched=True`` also decode the same
references with another utterance's audio (``val/asr_mismatched_wer``: what the text prior alone reaches).
Teacher-forced NLL can fall while transcripts stay wrong, so this is the curve to watch.
"""

from __future__ import annotations

import lightning as L
import torch

from most_lightning.metrics.transcripts import TranscriptErrorRates


class ASRWERCurve(L.Callback):
    def __init__(self, limit: int = 50, mismatched: bool = True, every_n_validations: int = 1):
        self.limit, self.mismatched, self.every = limit, mismatched, max(1, every_n_validations)
        self._validations = 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every:
            return
        datamodule = trainer.datamodule
        runs = [("asr", False)] + ([("asr_mismatched", True)] if self.mismatched else [])
        for name, mismatched in runs:
            scores = TranscriptErrorRates()
            for batch in datamodule.asr_generation_dataloader("validation", mismatched=mismatched, limit=self.limit):
                batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                scores.update(pl_module.transcribe(batch), batch["reference_text"])
            result = scores.compute()
            pl_module.log_dict({f"val/{name}_wer": result["wer"].item(), f"val/{name}_cer": result["cer"].item()},
                               sync_dist=True)
