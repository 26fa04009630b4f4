"""fp32 matrix products on the CPU through oneDNN, with torch's own matmul as the fallback and the oracle.

torch sends CPU fp32 matmuls to MKL's sgemm. On AMD EPYCs that runs an AVX2 kernel, ~45-55 GMAC/s per core,
while oneDNN (built into torch as MKL-DNN) dispatches on the CPU's feature flags and runs the same fp32 products
with AVX-512: on cores that execute it at full width, 70-150 GMAC/s, a linear layer's forward + backward at the
`tiny` step's shapes 1.7-1.8x faster (``python experiments/bench_cpu_matmul.py``); on Zen 4, which splits it
into 256-bit halves, no faster than MKL. torch reaches oneDNN's fp32 matmul from Python only through
``torch.ops.mkldnn._linear_pointwise`` (an inference op without autograd), so this module wraps it:

- ``matmul_nt(a, b)`` = a @ b.T, ``matmul_nn(a, b)`` = a @ b, ``matmul_tn(a, b)`` = a.T @ b (2-D operands);
- ``linear(x, weight, bias)`` = F.linear with a oneDNN backward (an autograd Function), and ``Linear``,
  an nn.Linear that uses it (same parameters and state-dict keys);
- ``bucket_rows``, ``pad_rows``, ``gather_rows``: row counts padded to a few sizes, so that changing batch
  shapes reuse cached oneDNN primitives.

Every entry point takes ``backend``: "onednn" uses oneDNN where it applies (CPU, fp32, autocast off, oneDNN
built in) and torch otherwise; "torch" always uses torch; "auto" (the model's default) is whichever of the two
ran faster on this host (measured once, see model/matmul_choice.py: on a Zen 4 EPYC MKL already runs at the
core's peak and oneDNN is slower). The products are full fp32 (oneDNN's default strict
math mode): the two backends differ only in summation order, ~1e-6 relative.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from most_lightning.model.matmul_choice import auto_backend

Backend = Literal["auto", "onednn", "torch"]
BACKENDS = ("auto", "onednn", "torch")
_ONEDNN_BUILT = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"cpu_matmul={backend!r}: allowed values are {list(BACKENDS)}")


def uses_onednn(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether products of these tensors go through oneDNN under ``backend``."""
    applies = (backend != "torch" and _ONEDNN_BUILT and torch.backends.mkldnn.enabled
               and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() > 0 for t in tensors)
               and not torch.is_autocast_enabled("cpu"))
    return applies and (backend == "onednn" or auto_backend() == "onednn")


def bucket_rows(n: int) -> int:
    """n rounded up to one of 8 to 16 sizes per power of two (at most 1/8 more; exact up to 32).

    oneDNN builds a primitive for every new matmul shape (~1 ms here) and caches it. Training changes the
    token count with every batch and the rows per expert with every routing decision, so exact shapes would
    pay that cost on most calls; padded to buckets, a run reuses a few hundred cached primitives."""
    if n <= 32:
        return n
    step = 1 << max(n.bit_length() - 4, 4)
    return -(-n // step) * step


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    """t [n, ...] with zero rows appended up to bucket_rows(n) (t itself when n is a bucket size)."""
    n = t.shape[0]
    rows = bucket_rows(n)
    if rows == n:
        return t
    padded = t.new_empty(rows, *t.shape[1:])
    padded[:n] = t
    padded[n:] = 0
    return padded


def pad_rows(t: torch.Tensor, backend: Backend = "onednn") -> torch.Tensor:
    """t with zero rows up to bucket_rows where oneDNN multiplies it (t itself otherwise). A product of a
    padded operand needs no padding copy of its own; callers cut its extra rows off."""
    return _pad_rows(t) if uses_onednn(backend, t) else t


def gather_rows(x: torch.Tensor, index: torch.Tensor, backend: Backend = "onednn") -> torch.Tensor:
    """x.index_select(0, index), written straight into a ``pad_rows``-sized buffer where oneDNN applies."""
    if not uses_onednn(backend, x) or index.numel() == 0:
        return x.index_select(0, index)
    n = index.shape[0]
    out = x.new_empty(bucket_rows(n), *x.shape[1:])
    torch.index_select(x, 0, index, out=out[:n])
    out[n:] = 0
    return out


def _nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b [N, K].T (+ bias) by oneDNN (b is what oneDNN calls the weight; any strides), with M
    padded to bucket_rows(M) inside."""
    return torch.ops.mkldnn._linear_pointwise(_pad_rows(a), b, bias, "none", [], "")[: a.shape[0]]


def matmul_nt(a: torch.Tensor, b: torch.Tensor, backend: Backend = "onednn",
              out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T, into ``out`` if given; ``out`` may have fewer rows than ``a`` (it gets the first ones: a
    ``pad_rows``-padded operand's padding is dropped)."""
    if uses_onednn(backend, a, b):
        return _nt(a, b) if out is None else out.copy_(_nt(a, b)[: out.shape[0]])
    return a @ b.T if out is None else torch.mm(a[: out.shape[0]], b.T, out=out)


def matmul_nn(a: torch.Tensor, b: torch.Tensor, backend: Backend = "onednn") -> torch.Tensor:
    return _nt(a, b.T) if uses_onednn(backend, a, b) else a @ b


def matmul_nn_sum(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
                  backend: Backend = "onednn", out: torch.Tensor | None = None) -> torch.Tensor:
    """a1 @ b1 + a2 @ b2, into ``out`` if given (which may have fewer rows, as in matmul_nt). torch's matmul
    adds the second product into the first inside the GEMM (beta = 1), one pass over the result fewer than a
    separate add (MoE layer at shape S with MKL: ~5 ms of ~320 per step); oneDNN's fused sum post-op measured
    no faster than the add."""
    rows = a1.shape[0] if out is None else out.shape[0]
    if uses_onednn(backend, a1, b1, a2, b2):
        first, second = _nt(a1, b1.T)[:rows], _nt(a2, b2.T)[:rows]
        return first.add_(second) if out is None else torch.add(first, second, out=out)
    return torch.mm(a1[:rows], b1, out=out).addmm_(a2[:rows], b2)


def matmul_tn(a: torch.Tensor, b: torch.Tensor, backend: Backend = "onednn",
              out: torch.Tensor | None = None) -> torch.Tensor:
    """a [K, M].T @ b [K, N] (a weight gradient: K runs over tokens), into ``out`` [M, N] if given.

    oneDNN wants its left operand with K contiguous, so one operand gets a transposed copy; copying the narrower
    one is faster: a.T when M <= N (the result comes out contiguous), else b.T (computing (b.T @ a).T: the
    result is a transposed view). torch's matmul writes into ``out`` directly, oneDNN's result is copied."""
    if not uses_onednn(backend, a, b):
        return a.T @ b if out is None else torch.mm(a.T, b, out=out)
    a, b = _pad_rows(a), _pad_rows(b)  # zero rows add nothing; K (tokens) padded to a bucket size
    result = _nt(a.T, b.T) if a.shape[1] <= b.shape[1] else _nt(b.T, a.T).T
    return result if out is None else out.copy_(result)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _nt(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _nt(grad_2d, weight.T).view(*x.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_weight = matmul_tn(grad_2d, x.reshape(-1, x.shape[-1])).contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: Backend = "onednn") -> torch.Tensor:
    """F.linear(x, weight, bias); forward and backward by oneDNN where ``uses_onednn``."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not uses_onednn(backend, *tensors):
        return F.linear(x, weight, bias)
    return _OneDNNLinear.apply(x.contiguous(), weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose products go through ``linear`` (same parameters, state-dict keys and init)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, backend: Backend = "onednn",
                 **factory):
        super().__init__(in_features, out_features, bias, **factory)
        check_backend(backend)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend}"
