"""Causal-LM loss with its per-token breakdown (by target modality, by task, TTS unit span).

Labels are aligned with input_ids (contract): position t's logits predict labels[t + 1]; -100 means no loss.
Everything is computed once as per-token NLL and then summed over masks, so every breakdown is an exact
token-weighted slice of the same loss (the slices of one partition add back up to the total).

``fused_token_losses`` is the training path of ``MoSTForCausalLM(labels=..., compute_logits=False)``: it takes
the final hidden states and the LM-head weight instead of logits, runs the LM head only on the supervised
positions, chunk by chunk, and computes the gradients in the same pass, so the [tokens, vocab] logits and their
gradient never exist whole (model/loss.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from most_lightning.marks import IGNORE_INDEX, MODALITY_NAMES
from most_lightning.model.loss import linear_cross_entropy

TASK_NAMES = ("asr", "tts", "text")


@dataclass
class TokenLosses:
    """Per-target-token NLL of one batch, with the masks the breakdowns need. Shapes [B, T-1]."""

    nll: torch.Tensor  # float32; 0 where not valid
    valid: torch.Tensor  # bool: label != -100
    correct: torch.Tensor | None  # bool: argmax(logits) == label (only meaningful where valid); None if not asked
    target_modality: torch.Tensor  # long: modality mark of the target token
    target_ids: torch.Tensor  # long: the labels, shifted
    # Fused path only: the differentiable sum of nll over the valid tokens. There ``nll`` itself is detached, so
    # only mean() without a mask carries gradients (the masked means are logged breakdowns).
    total: torch.Tensor | None = None
    tasks: Sequence[str] | None = None  # the task of each row, when the caller gave them (by_task)

    @property
    def n_tokens(self) -> torch.Tensor:
        return self.valid.sum()

    def mean(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token-mean NLL over valid tokens (and `mask`); 0 (differentiable) when no token is selected."""
        if mask is None and self.total is not None:
            return self.total / self.valid.sum().clamp(min=1)
        sel = self.valid if mask is None else self.valid & mask
        return (self.nll * sel).sum() / sel.sum().clamp(min=1)

    def sum_and_count(self, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        sel = self.valid if mask is None else self.valid & mask
        return (self.nll * sel).sum(), sel.sum()

    def sum_and_count_by_row(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL [B] and number of supervised tokens [B] of each row: a sequence's negative log-likelihood
        (scoring, e.g. minimal pairs)."""
        return (self.nll * self.valid).sum(1), self.valid.sum(1)

    def modality_mask(self, modality: int) -> torch.Tensor:
        return self.target_modality == modality

    def task_mask(self, tasks: Sequence[str], task: str) -> torch.Tensor:
        rows = torch.tensor([t == task for t in tasks], device=self.nll.device)
        return rows[:, None].expand_as(self.valid)

    def by_modality(self) -> dict[str, torch.Tensor]:
        """Token-mean NLL by the modality of the target token, for each modality that has a supervised target."""
        means = {}
        for mark, name in enumerate(MODALITY_NAMES):
            mask = self.modality_mask(mark)
            if bool((mask & self.valid).any()):
                means[name] = self.mean(mask)
        return means

    def by_task(self) -> dict[str, torch.Tensor]:
        """Token-mean NLL by task, for each task among the rows (0 for a task whose rows supervise nothing)."""
        if self.tasks is None:
            raise ValueError("the loss by task needs the task of each row: pass tasks=[...] with the labels")
        return {task: self.mean(self.task_mask(self.tasks, task)) for task in sorted(set(self.tasks))}


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


def fused_token_losses(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                       modality: torch.Tensor, chunk_rows: int = 256, want_correct: bool = False) -> TokenLosses:
    """Same per-token losses as ``shifted_token_losses(hidden @ lm_head_weight.T, labels, modality)``, computed
    from the final hidden states [B, T, H]: the LM head runs only on positions whose next label is supervised,
    ``chunk_rows`` rows at a time (model/loss.py). ``correct`` is filled only when ``want_correct``
    (an extra argmax pass that training does not need). Only ``mean()`` without a mask is differentiable."""
    if hidden.shape[:2] != labels.shape or labels.shape != modality.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)} and modality "
            f"{tuple(modality.shape)} must agree on [B, T]"
        )
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be a positive number of rows")
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    rows = valid.reshape(-1).nonzero().squeeze(1)
    # Positions whose next label is ignored (prompts, padding) never reach the LM head.
    selected = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, rows)
    total, nll_rows, *correct_rows = linear_cross_entropy(
        selected, lm_head_weight, target.reshape(-1).index_select(0, rows), chunk_rows, want_correct)
    nll = torch.zeros(target.shape, dtype=torch.float32, device=hidden.device)
    nll.view(-1).index_copy_(0, rows, nll_rows)
    correct = None
    if want_correct:
        correct = torch.zeros(target.shape, dtype=torch.bool, device=hidden.device)
        correct.view(-1).index_copy_(0, rows, correct_rows[0])
    return TokenLosses(nll=nll, valid=valid, correct=correct, target_modality=modality[:, 1:], target_ids=target,
                       total=total)
