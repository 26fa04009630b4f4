"""Corpus-level WER and CER of transcripts (torchmetrics), after one text normaliser on both sides.

By default lower-case, punctuation stripped, spaces collapsed: the usual protocol for the published LibriSpeech
numbers (docs/model_spec.md section 6); configurable, see most_lightning.metrics.normalize.TextNormalizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.text import CharErrorRate, WordErrorRate

from most_lightning.metrics.normalize import DEFAULT_NORMALIZER, TextNormalizer


def normalize_transcript(text: str) -> str:
    """Lower-case, strip punctuation (apostrophes inside words are kept), collapse whitespace."""
    return DEFAULT_NORMALIZER(text)


class TranscriptErrorRates(Metric):
    """Corpus-level WER and CER over normalised transcripts.

    Wraps torchmetrics' WordErrorRate / CharErrorRate (which agree with jiwer) and counts references that
    are empty after normalisation: torchmetrics would make them inf, so they are left out and counted.
    """

    full_state_update = False

    def __init__(self, normalizer: TextNormalizer | None = None) -> None:
        super().__init__()
        self.normalizer = normalizer or DEFAULT_NORMALIZER
        self.wer = WordErrorRate()
        self.cer = CharErrorRate()
        self.add_state("n_utterances", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("n_empty_references", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, hypotheses: Sequence[str], references: Sequence[str]) -> None:  # type: ignore[override]
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
        pairs = [(self.normalizer(h), self.normalizer(r)) for h, r in zip(hypotheses, references)]
        kept = [(h, r) for h, r in pairs if r]
        self.n_empty_references += len(pairs) - len(kept)
        self.n_utterances += len(kept)
        if kept:
            preds, targets = map(list, zip(*kept))
            self.wer.update(preds, targets)
            self.cer.update(preds, targets)

    def compute(self) -> dict[str, torch.Tensor]:
        if int(self.n_utterances) == 0:
            nan = torch.tensor(float("nan"))
            return {"wer": nan, "cer": nan, "n_utterances": self.n_utterances,
                    "n_empty_references": self.n_empty_references}
        return {"wer": self.wer.compute(), "cer": self.cer.compute(), "n_utterances": self.n_utterances,
                "n_empty_references": self.n_empty_references}

    def reset(self) -> None:
        super().reset()
        self.wer.reset()
        self.cer.reset()
