"""Causal-LM loss with its per-token breakdown (by target modality, by task, TTS unit span).

Labels are aligned with input_ids (contract): position t's logits predict labels[t + 1]; -100 means no loss.
Everything is computed once as per-token NLL and then summed over masks, so every breakdown is an exact
token-weighted slice of the same loss (the slices of one partition add back up to the total).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
MODALITY_NAMES = ("text", "audio")  # modality mark 0 / 1
TASK_NAMES = ("asr", "tts", "text")


@dataclass
class TokenLosses:
    """Per-target-token NLL of one batch, with the masks the breakdowns need. Shapes [B, T-1]."""

    nll: torch.Tensor  # float32; 0 where not valid
    valid: torch.Tensor  # bool: label != -100
    correct: torch.Tensor  # bool: argmax(logits) == label (only meaningful where valid)
    target_modality: torch.Tensor  # long: modality mark of the target token
    target_ids: torch.Tensor  # long: the labels, shifted

    @property
    def n_tokens(self) -> torch.Tensor:
        return self.valid.sum()

    def mean(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token-mean NLL over valid tokens (and `mask`); 0 (differentiable) when no token is selected."""
        sel = self.valid if mask is None else self.valid & mask
        return (self.nll * sel).sum() / sel.sum().clamp(min=1)

    def sum_and_count(self, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        sel = self.valid if mask is None else self.valid & mask
        return (self.nll * sel).sum(), sel.sum()

    def modality_mask(self, modality: int) -> torch.Tensor:
        return self.target_modality == modality

    def task_mask(self, tasks: Sequence[str], task: str) -> torch.Tensor:
        rows = torch.tensor([t == task for t in tasks], device=self.nll.device)
        return rows[:, None].expand_as(self.valid)


def shifted_token_losses(
    logits: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor
) -> TokenLosses:
    """Cross entropy of logits[:, :-1] against labels[:, 1:], in fp32, per token."""
    if logits.shape[:2] != labels.shape or labels.shape != modality.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and modality "
            f"{tuple(modality.shape)} must agree on [B, T]"
        )
    shift_logits = logits[:, :-1].float()
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(target)
    with torch.no_grad():
        correct = shift_logits.argmax(-1) == target
    return TokenLosses(
        nll=nll, valid=valid, correct=correct, target_modality=modality[:, 1:], target_ids=target
    )
