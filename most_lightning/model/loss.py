"""The LM head and its cross entropy in one pass, chunk by chunk, on the supervised positions only.

``linear_cross_entropy(hidden, weight, targets)`` = sum_i CE(hidden[i] @ weight.T, targets[i]) without the
[M, V] logits or their gradient ever existing whole: rows go through in chunks (logits -> log_softmax -> nll,
and when gradients are needed, the chunk's softmax minus the one-hot target turned at once into its share of
d/d hidden and d/d weight). The matmul work is the same as lm_head + cross_entropy (3 matmuls); the saving is
memory and one cache-sized pass per chunk instead of several over the whole [M, V] array. The training loss
(model/token_losses.py: fused_token_losses) calls it with the rows whose next label is supervised.
"""

from __future__ import annotations

import torch


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Inputs: hidden [M, H], weight [V, H] (same dtype; fp32 log-softmax), targets [M] (all valid), chunk_rows,
    want_correct. Outputs: the summed nll (differentiable, fp32), per-row nll [M] and, when ``want_correct``,
    argmax == target [M] (both detached)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, want_correct: bool):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = hidden.shape[0]
        nll = hidden.new_empty(rows, dtype=torch.float32)
        correct = torch.empty(rows, dtype=torch.bool, device=hidden.device) if want_correct else None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Low-precision weights: the chunks' shares are accumulated in fp32.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        for start in range(0, rows, chunk_rows):
            end = min(start + chunk_rows, rows)
            h, t = hidden[start:end], targets[start:end, None]
            logp = torch.log_softmax((h @ weight.T).float(), dim=-1)
            nll[start:end] = logp.gather(1, t).squeeze(1).neg_()
            if want_correct:
                correct[start:end] = logp.argmax(-1) == t.squeeze(1)
            if need_hidden or need_weight:
                d_logits = logp.exp_()  # softmax, in place
                d_logits.scatter_add_(1, t, d_logits.new_full(t.shape, -1.0))
                d_logits = d_logits.to(hidden.dtype)
                if need_hidden:
                    torch.mm(d_logits, weight, out=grad_hidden[start:end])
                if need_weight and grad_weight.dtype == h.dtype:
                    grad_weight.addmm_(d_logits.T, h)
                elif need_weight:
                    grad_weight += (d_logits.T @ h).float()
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
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 256,
                         want_correct: bool = False) -> tuple[torch.Tensor, ...]:
    """(summed nll, per-row nll[, correct]) of ``hidden`` [M, H] through the LM head ``weight`` [V, H] against
    ``targets`` [M]; under autocast the matmuls run in autocast's dtype, as nn.Linear's would."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be a positive number of rows")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        # The Function runs with autocast off (its out= matmuls would not mix dtypes): cast as autocast would.
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):
        return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, want_correct)
