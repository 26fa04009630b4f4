"""Causal-LM loss with its per-token breakdown (by target modality, by task, TTS unit span).

Labels are aligned with input_ids (contract): position t's logits predict labels[t + 1]; -100 means no loss.
Everything is computed once as per-token NLL and then summed over masks, so every breakdown is an exact
token-weighted slice of the same loss (the slices of one partition add back up to the total).

``fused_token_losses`` is the training path: it takes the final hidden states and the LM-head weight instead
of logits, runs the LM head only on the supervised positions, chunk by chunk, and computes the gradients in
the same pass, so the [tokens, vocab] logits and their gradient never exist whole (see FusedLinearCrossEntropy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from most_lightning.marks import IGNORE_INDEX, MODALITY_NAMES  # noqa: F401 (re-exported)
from most_lightning.model.gemm import Backend, matmul_nn, matmul_nt, matmul_tn, uses_onednn

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


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden[i] @ weight.T, targets[i]) without materialising the [M, V] logits or their gradient.

    Rows go through in chunks: logits of a chunk -> log_softmax -> nll; when gradients are needed, the same
    chunk's softmax minus the one-hot target (d nll / d logits) is turned at once into its share of
    d/d hidden (chunk rows) and d/d weight (accumulated). Every elementwise pass touches one cache-sized chunk
    instead of the whole [M, V] array, and the gradients are ready when backward comes (it only scales them
    by the incoming scalar). The matmul work is the same as plain lm_head + cross_entropy (3 matmuls).

    Inputs: hidden [M, H], weight [V, H] (fp32 accumulation whatever their dtype), targets [M] (all valid).
    Outputs: the summed nll (differentiable, fp32), per-row nll [M] and argmax == target [M] (both detached;
    the latter only when ``want_correct``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, want_correct: bool, backend: Backend):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = hidden.shape[0]
        nll = hidden.new_empty(rows, dtype=torch.float32)
        correct = torch.empty(rows, dtype=torch.bool, device=hidden.device) if want_correct else None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # oneDNN: the weight gradient is accumulated transposed ([H, V]), the layout its matmul writes
        # contiguously (gemm.matmul_tn), and transposed once at the end.
        transposed = uses_onednn(backend, hidden, weight)
        grad_weight = None
        if need_weight:
            grad_weight = hidden.new_zeros(weight.shape[::-1] if transposed else weight.shape, dtype=torch.float32)
        for start in range(0, rows, chunk_rows):
            end = min(start + chunk_rows, rows)
            h, t = hidden[start:end], targets[start:end, None]
            logp = torch.log_softmax(matmul_nt(h, weight, backend).float(), dim=-1)  # one fused pass over the chunk
            nll[start:end] = logp.gather(1, t).squeeze(1).neg_()
            if want_correct:
                correct[start:end] = logp.argmax(-1) == t.squeeze(1)
            if need_hidden or need_weight:
                d_logits = logp.exp_()  # softmax, in place
                d_logits.scatter_add_(1, t, d_logits.new_full(t.shape, -1.0))
                d_logits = d_logits.to(hidden.dtype)
                if need_hidden:
                    grad_hidden[start:end] = matmul_nn(d_logits, weight, backend)
                if need_weight and transposed:
                    grad_weight += matmul_tn(h, d_logits, backend)
                elif need_weight and grad_weight.dtype == h.dtype:
                    grad_weight.addmm_(d_logits.T, h)
                elif need_weight:  # low-precision weights: accumulate the chunks' shares in fp32
                    grad_weight += (d_logits.T @ h).float()
        if need_weight and transposed:
            grad_weight = grad_weight.T.contiguous()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        outputs = (nll.sum(), nll) + ((correct,) if want_correct else ())
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_total, *_):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def fused_token_losses(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                       modality: torch.Tensor, chunk_rows: int = 256, want_correct: bool = False,
                       backend: Backend = "auto") -> TokenLosses:
    """Same per-token losses as ``shifted_token_losses(hidden @ lm_head_weight.T, labels, modality)``, computed
    from the final hidden states [B, T, H]: the LM head runs only on positions whose next label is supervised,
    ``chunk_rows`` rows at a time (FusedLinearCrossEntropy). ``correct`` is filled only when ``want_correct``
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
    if torch.is_autocast_enabled(hidden.device.type):
        # The Function runs with autocast off (its out= matmuls would not mix dtypes): cast as autocast would.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        selected, lm_head_weight = selected.to(dtype), lm_head_weight.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        total, nll_rows, *correct_rows = FusedLinearCrossEntropy.apply(
            selected, lm_head_weight, target.reshape(-1).index_select(0, rows), chunk_rows, want_correct, backend)
    nll = torch.zeros(target.shape, dtype=torch.float32, device=hidden.device)
    nll.view(-1).index_copy_(0, rows, nll_rows)
    correct = None
    if want_correct:
        correct = torch.zeros(target.shape, dtype=torch.bool, device=hidden.device)
        correct.view(-1).index_copy_(0, rows, correct_rows[0])
    return TokenLosses(nll=nll, valid=valid, correct=correct, target_modality=modality[:, 1:], target_ids=target,
                       total=total)
