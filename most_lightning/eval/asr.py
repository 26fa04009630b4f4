"""ASR scoring: transcript normalisation and corpus-level WER/CER with torchmetrics.

Both hypotheses and references go through the same normaliser (lower-case, punctuation stripped, spaces
collapsed), the usual protocol for the published LibriSpeech numbers (MOST_SPEC section 6).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.text import CharErrorRate, WordErrorRate

_PUNCTUATION = re.compile(r"[^\w\s']|_")  # keep apostrophes: "don't" stays one word
_SPACES = re.compile(r"\s+")


def normalize_transcript(text: str) -> str:
    """Lower-case, strip punctuation (apostrophes inside words are kept), collapse whitespace."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCTUATION.sub(" ", text)
    text = re.sub(r"(^|\s)'+|'+(\s|$)", r"\1 \2", text)  # quote marks, not apostrophes
    return _SPACES.sub(" ", text).strip()


class TranscriptErrorRates(Metric):
    """Corpus-level WER and CER over normalised transcripts.

    Wraps torchmetrics' WordErrorRate / CharErrorRate (which agree with jiwer) and counts references that
    are empty after normalisation: torchmetrics would make them inf, so they are left out and counted.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.wer = WordErrorRate()
        self.cer = CharErrorRate()
        self.add_state("n_utterances", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("n_empty_references", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, hypotheses: Sequence[str], references: Sequence[str]) -> None:  # type: ignore[override]
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
        pairs = [(normalize_transcript(h), normalize_transcript(r)) for h, r in zip(hypotheses, references)]
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
            return {"wer": nan, "cer": nan, "n_utterances": self.n_utterances}
        return {"wer": self.wer.compute(), "cer": self.cer.compute(), "n_utterances": self.n_utterances}

    def reset(self) -> None:
        super().reset()
        self.wer.reset()
        self.cer.reset()
