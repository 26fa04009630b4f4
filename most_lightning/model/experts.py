"""SwiGLU feed-forward blocks: the dense MLP and the stacked routed experts of an MoE layer.

``GroupedExperts`` computes, dropless, y[n] = sum_j w[n, j] * expert_{e[n, j]}(x[n]) with
expert(x) = (silu(x W_g^T) * (x W_u^T)) W_d^T, in plain torch with autograd. The (token, slot) pairs are
sorted by expert, the token rows gathered once (``index_select``) and summed back once (``index_add``), and one
of two dispatch paths runs the per-expert matmuls over the sorted rows:

- ``"grouped_mm"``: ``F.grouped_mm`` with the expert boundaries as device offsets: one fused grouped GEMM
  per projection on Hopper-class GPUs in bf16, and no host sync.
- ``"loop"``: a Python loop over the experts (rows split once by the expert counts, weights ``unbind``-ed
  once: indexing ``w[e]`` per expert would make every backward write a full-size zero gradient of the whole
  stack per expert, O(E^2) memory traffic). It needs the counts on the host. It is the test oracle of the
  grouped path and the CPU's default path (docs/training_speed.md compares the two there).

``"auto"`` picks between them from the device and the compute dtype (autocast's when autocast is on):
``choose_dispatch``, a pure function, so every case is unit-tested without a GPU. The shared experts are
not part of this module: the MoE layer adds them (moe.py).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Dispatch = Literal["auto", "grouped_mm", "loop"]
DISPATCHES = ("auto", "grouped_mm", "loop")
# grouped_mm's kernels need every row of both operands to start on a 16-byte boundary.
GROUPED_MM_ALIGN_BYTES = 16
LOW_PRECISION = (torch.bfloat16, torch.float16)


class DispatchError(ValueError):
    """``expert_dispatch=grouped_mm`` where grouped_mm cannot run; the message names the reason."""


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP without biases: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ------------------------------------------------------------------------------------------------ dispatch
def grouped_mm_unavailable(device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype,
                           widths: tuple[int, ...]) -> str | None:
    """Why ``F.grouped_mm`` cannot run the experts here, or None if it can.

    ``capability``: the CUDA device's compute capability (None off CUDA); ``dtype``: the compute dtype;
    ``widths``: the row lengths of the operands (hidden and expert width)."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    if device_type == "cuda" and (capability is None or capability < (8, 0)):
        return f"grouped_mm needs a CUDA GPU of compute capability >= 8.0, this one has {capability}"
    if device_type not in ("cuda", "cpu"):
        return f"grouped_mm is not available on {device_type!r} devices"
    if dtype not in (torch.float32, *LOW_PRECISION):
        return f"grouped_mm runs fp32/bf16/fp16, the compute dtype here is {dtype}"
    size = torch.empty((), dtype=dtype).element_size()
    misaligned = [w for w in widths if w * size % GROUPED_MM_ALIGN_BYTES]
    if misaligned:
        return (f"grouped_mm needs rows of a multiple of {GROUPED_MM_ALIGN_BYTES} bytes; widths {misaligned} in "
                f"{dtype} are not (use widths that are multiples of {GROUPED_MM_ALIGN_BYTES // size})")
    return None


def choose_dispatch(requested: str, device_type: str, capability: tuple[int, int] | None,
                    autocast_dtype: torch.dtype | None, input_dtype: torch.dtype, widths: tuple[int, ...]) -> str:
    """The dispatch path ("grouped_mm" or "loop") that the experts take.

    The compute dtype is ``autocast_dtype`` when autocast is on for the device (pass None when it is off), else
    the input's dtype. "auto": grouped_mm on CUDA GPUs of capability >= 8.0 whenever the compute dtype is
    bf16/fp16 and the widths are aligned; the loop everywhere else (the tested oracle; on the CPU see
    docs/training_speed.md for loop vs grouped_mm). "grouped_mm" where it cannot run raises DispatchError with the reason."""
    if requested not in DISPATCHES:
        raise DispatchError(f"model.expert_dispatch={requested!r}: allowed values are {list(DISPATCHES)}")
    dtype = autocast_dtype or input_dtype
    if requested == "loop":
        return "loop"
    reason = grouped_mm_unavailable(device_type, capability, dtype, widths)
    if requested == "grouped_mm":
        if reason is not None:
            raise DispatchError(f"model.expert_dispatch=grouped_mm cannot run: {reason}; "
                                "use model.expert_dispatch=auto or loop")
        return "grouped_mm"
    # fp32 on CUDA: torch's grouped_mm runs its per-group fallback there (host sync, one matmul per group, as the
    # loop does), so "auto" keeps the loop, which is the tested oracle.
    return "grouped_mm" if device_type == "cuda" and dtype in LOW_PRECISION and reason is None else "loop"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's for x's device when autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ------------------------------------------------------------------------------------------------ the maths
def sort_by_expert(expert_indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the N*k (token, slot) pairs by expert, on the device (no host sync).

    Returns ``order`` [N*k] (flat slot positions sorted by expert, stable), ``token_index`` [N*k] (the token of
    each sorted pair) and ``counts`` [E] (pairs per expert).
    """
    flat = expert_indices.reshape(-1)
    order = flat.argsort(stable=True)
    # scatter_add, not bincount: CUDA's bincount reads the maximum back to the host.
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, order // expert_indices.shape[1], counts


def grouped_mm_swiglu(x_sorted: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                      down: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rows of x_sorted [M, H] (blocks of counts[e] rows per expert) through their expert's SwiGLU, each scaled
    by its gate weight ``scale`` [M]; F.grouped_mm with device offsets."""
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    a = F.grouped_mm(x_sorted, gate.transpose(1, 2), offs=offsets)
    b = F.grouped_mm(x_sorted, up.transpose(1, 2), offs=offsets)
    return F.grouped_mm(F.silu(a) * b * scale[:, None], down.transpose(1, 2), offs=offsets)


def loop_swiglu(x_sorted: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Same as grouped_mm_swiglu with one F.linear per expert (the counts come to the host once)."""
    sizes = counts.tolist()
    outs = [F.linear(F.silu(F.linear(x_e, g)) * F.linear(x_e, u) * s[:, None], d)
            for x_e, s, g, u, d, n in zip(x_sorted.split(sizes), scale.split(sizes), gate.unbind(0),
                                          up.unbind(0), down.unbind(0), sizes) if n]
    return torch.cat(outs) if outs else x_sorted.new_zeros(0, down.shape[1])


class GroupedExperts(nn.Module):
    """``n_experts`` SwiGLU experts stored stacked like nn.Linear weights (checkpoint import is a stack()).

    gate_proj [E, I, H], up_proj [E, I, H], down_proj [E, H, I]. ``dispatch``: "auto", "grouped_mm" or "loop"
    (see choose_dispatch). Experts that receive no tokens still get an all-zero gradient (DDP needs every
    parameter to get one).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, n_experts: int, dispatch: Dispatch = "auto"):
        super().__init__()
        if dispatch not in DISPATCHES:
            raise DispatchError(f"expert dispatch {dispatch!r} is unknown; choose one of {DISPATCHES}")
        self.hidden_size, self.intermediate_size, self.n_experts = hidden_size, intermediate_size, n_experts
        self.dispatch = dispatch
        self.gate_proj = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """normal(0, std) if ``std`` is given, else nn.Linear's default init (kaiming uniform) per expert."""
        for weight in (self.gate_proj, self.up_proj, self.down_proj):
            if std is not None:
                nn.init.normal_(weight, std=std)
            else:  # bound of nn.Linear's kaiming_uniform_(a=sqrt(5)): 1 / sqrt(fan_in)
                nn.init.uniform_(weight, -1 / math.sqrt(weight.shape[-1]), 1 / math.sqrt(weight.shape[-1]))

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [E, I, H], up [E, I, H], down [E, H, I]), whatever the storage layout."""
        return self.gate_proj, self.up_proj, self.down_proj

    def resolved_dispatch(self, x: torch.Tensor) -> str:
        """The path this input takes (choose_dispatch on x's device and compute dtype)."""
        device = x.device
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        return choose_dispatch(self.dispatch, device.type, capability, autocast, x.dtype,
                               (self.hidden_size, self.intermediate_size))

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        """x [N, H]; expert_indices [N, k] (distinct per row); expert_weights [N, k] -> [N, H]."""
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"experts expect x of shape [N, {self.hidden_size}], got {tuple(x.shape)}")
        if expert_indices.shape != expert_weights.shape or expert_indices.shape[0] != x.shape[0]:
            raise ValueError(f"expert_indices {tuple(expert_indices.shape)} and expert_weights "
                             f"{tuple(expert_weights.shape)} must both be [N={x.shape[0]}, k]")
        swiglu = grouped_mm_swiglu if self.resolved_dispatch(x) == "grouped_mm" else loop_swiglu
        dtype = compute_dtype(x)
        weights = self.stacked_weights()
        if torch.is_autocast_enabled(x.device.type):
            # Autocast's op lists cover neither grouped_mm nor the casts the loop needs once: cast by hand, as
            # autocast does for nn.Linear (fp32 master weights, bf16/fp16 compute).
            x, weights = x.to(dtype), tuple(w.to(dtype) for w in weights)
        elif any(w.dtype != x.dtype for w in weights):
            held = next(w.dtype for w in weights if w.dtype != x.dtype)
            raise TypeError(f"experts got {x.dtype} input but hold {held} weights; cast the module "
                            f"(experts.to({x.dtype})) or run under torch.autocast")
        order, token_index, counts = sort_by_expert(expert_indices, self.n_experts)
        scale = expert_weights.to(dtype).reshape(-1).index_select(0, order)
        with torch.autocast(x.device.type, enabled=False):
            y_sorted = swiglu(x.index_select(0, token_index), counts, *weights, scale)
            # index_add's backward hands grouped_mm a contiguous gradient (its backward fails on stride-0 ones).
            return x.new_zeros(x.shape).index_add_(0, token_index, y_sorted)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"n_experts={self.n_experts}, dispatch={self.dispatch!r}")
