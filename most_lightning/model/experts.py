"""SwiGLU feed-forward blocks: the dense MLP and the stacked routed experts of an MoE layer.

``GroupedExperts`` computes, dropless, y[n] = sum_j w[n, j] * expert_{e[n, j]}(x[n]) with
expert(x) = (silu(x W_g^T) * (x W_u^T)) W_d^T. Its token copies are sorted by expert, then one of two
dispatch paths runs the per-expert matmuls:

- ``"loop"``: a Python loop over the experts inside one autograd Function (CPU default, test oracle for the
  other path). Each expert gathers its tokens and runs its whole SwiGLU while its rows are still in cache,
  which keeps every elementwise op on a small, cache-resident block; the backward is written by hand. This is
  what makes the layer about as fast as a dense SwiGLU of the same active FLOPs on a CPU
  (experiments/bench_moe.py). Measured at the benchmark's shape S (~340 ms per step, torch matmul):
  the experts write their output rows in the sorted order and one ``F.embedding_bag`` then sums each token's
  k rows, and the backward combines the input gradients the same way (a single parallel pass instead of an
  index_add per expert into a zeroed buffer: -4.7 ms); a shared expert passed in runs as one more unit of work
  whose rows join that sum (no separate add of its output or of its input gradient: -3.1 to -3.9 ms); the
  gathered input rows are kept for the backward, as grouped_mm's autograd keeps its sorted copy of x
  (gathering them again from an x long out of cache: +1.5-2 ms). Weight gradients are written straight into
  slices of one stacked tensor: indexing ``w[e]`` under autograd would instead add a full-size zero gradient
  per expert (O(E^2) memory traffic, NOTES.md).
  On the CPU, large batches are shared out among torch.get_num_threads() worker threads that each run
  their rows with ONE intra-op thread, instead of running every small op with all OpenMP threads. On an idle
  machine that is within a few percent either way, but when other processes compete for the cores, the
  hundreds of small OpenMP parallel regions (each waiting at a barrier for a descheduled thread) made the
  layer 4-10x slower than a dense SwiGLU; split by rows it stayed within ~1.2-1.35x.
- ``"grouped_mm"``: ``torch.nn.functional.grouped_mm`` over the sorted tokens (fused grouped GEMM on
  Hopper-class GPUs; on the CPU it runs one matmul per group and is slower than the loop).

Experts that receive no tokens still get an all-zero gradient (DDP needs every parameter to get one).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from most_lightning.model.gemm import (Backend, Linear, check_backend, gather_rows, matmul_nn, matmul_nn_sum, matmul_nt,
                                      matmul_tn, pad_rows, uses_onednn)

Dispatch = Literal["auto", "grouped_mm", "loop"]
DISPATCHES = ("auto", "grouped_mm", "loop")


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP without biases: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, cpu_matmul: Backend = "auto"):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False, backend=cpu_matmul)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False, backend=cpu_matmul)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False, backend=cpu_matmul)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def sort_by_expert(expert_indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the N*k (token, slot) pairs by expert.

    Returns ``order`` [N*k] (flat slot positions sorted by expert, stable), ``token_index`` [N*k] (the token of
    each sorted pair) and ``counts`` [E] (pairs per expert).
    """
    flat = expert_indices.reshape(-1)
    order = flat.argsort(stable=True)
    return order, order // expert_indices.shape[1], torch.bincount(flat, minlength=n_experts)


def sorted_positions(order: torch.Tensor, top_k: int, shared: bool = False) -> torch.Tensor:
    """[N, k]: where each token's k (token, slot) pairs went in the sorted order (the inverse of ``order``);
    with ``shared``, [N, k + 1]: plus the token's shared-expert row, which follows the N * k routed rows."""
    positions = torch.empty_like(order)
    positions[order] = torch.arange(order.numel(), device=order.device)
    positions = positions.view(-1, top_k)
    if not shared:
        return positions
    shared_rows = torch.arange(order.numel(), order.numel() + positions.shape[0], device=order.device)
    return torch.cat([positions, shared_rows[:, None]], dim=1)


class _LoopSwiGLUExperts(torch.autograd.Function):
    """Grouped SwiGLU over experts with a hand-written backward; see the module docstring.

    Inputs: x [N, H], token_index [M] (tokens sorted by expert), positions [N, k] or, with a shared expert,
    [N, k + 1] (``sorted_positions``: each token's rows in the sorted buffers), weights [M] (gate weights in
    the sorted order), plan (the pieces of each thread, ``_plan``), routed gate/up [E, I, H] and down
    [E, H, I], the shared expert's gate/up [S, H] and down [H, S] (or three Nones), backend.
    Work comes in pieces (unit, start, end). Unit e < E is routed expert e over rows start:end of the sorted
    order (an expert may be cut in two pieces that run on different threads); unit E is the shared expert over
    tokens start:end (all tokens, weight 1, no gather), whose rows come after the M routed ones in the sorted
    buffers. Keeps the input rows and the pre-activations (gate and up outputs) per piece, rows padded as
    gemm.gather_rows pads them; everything else is recomputed per piece in cache.
    """

    @staticmethod
    def forward(ctx, x, token_index, positions, weights, plan, gate, up, down, shared_gate, shared_up, shared_down,
                backend):
        units = _units(gate, up, down, shared_gate, shared_up, shared_down)
        routed = gate.shape[0]
        saved: dict[Piece, tuple[torch.Tensor, ...]] = {}  # piece -> (input rows, gate out, up out)
        sorted_out = x.new_empty(_sorted_rows(token_index, x, shared_gate), x.shape[1])  # row: one (token, slot)

        def run(pieces: list[Piece]) -> None:
            for piece in pieces:
                unit, start, end = piece
                unit_gate, unit_up, unit_down = units[unit]
                # Rows padded with zeros to a oneDNN bucket size (gemm.pad_rows) stay zero through the SwiGLU.
                if unit < routed:
                    x_u = gather_rows(x, token_index[start:end], backend)
                else:
                    x_u = pad_rows(x[start:end], backend)
                a, b = matmul_nt(x_u, unit_gate, backend), matmul_nt(x_u, unit_up, backend)
                saved[piece] = x_u, a, b
                h = F.silu(a).mul_(b)
                if unit < routed:  # the gate weight scales the [n, I] activation rather than the [n, H] output
                    h.mul_(pad_rows(weights[start:end], backend)[:, None])
                matmul_nt(h, unit_down, backend, out=sorted_out[_buffer_rows(unit, start, end, routed, token_index)])

        _run_pieces(run, plan)
        ctx.save_for_backward(x, token_index, positions, weights, gate, up, down, shared_gate, shared_up, shared_down)
        ctx.plan, ctx.backend, ctx.saved = plan, backend, saved  # the backward walks the same pieces
        return F.embedding_bag(positions, sorted_out, mode="sum")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, token_index, positions, weights, gate, up, down, shared_gate, shared_up, shared_down = ctx.saved_tensors
        units = _units(gate, up, down, shared_gate, shared_up, shared_down)
        routed, saved, backend = gate.shape[0], ctx.saved, ctx.backend
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        need_routed = any(ctx.needs_input_grad[5:8])
        need_shared = shared_gate is not None and any(ctx.needs_input_grad[8:11])
        grad_out = grad_out.contiguous()
        sorted_grad_x = x.new_empty(_sorted_rows(token_index, x, shared_gate), x.shape[1]) if need_x else None
        grad_w = torch.empty_like(weights) if need_w else None
        # (down, gate, up) gradients per unit. A unit's first piece writes its slices directly (no zero-fill
        # pass); a later piece of the same unit, possibly on another thread, returns its share to be added.
        routed_grads = (torch.empty_like(down), torch.empty_like(gate), torch.empty_like(up)) if need_routed else ()
        shared_grads = tuple(torch.empty_like(t) for t in (shared_down, shared_gate, shared_up)) if need_shared else ()
        unit_grads = [tuple(grad[e] for grad in routed_grads) for e in range(routed)] + [shared_grads]
        first_start: dict[int, int] = {}
        for unit, start, _ in (piece for part in ctx.plan for piece in part):
            first_start[unit] = min(start, first_start.get(unit, start))

        def run(pieces: list[Piece]) -> list[tuple[int, tuple[torch.Tensor, ...]]]:
            shares = []
            for piece in pieces:
                unit, start, end = piece
                unit_gate, unit_up, unit_down = units[unit]
                n, targets, is_routed = end - start, unit_grads[unit], unit < routed
                if targets and start != first_start[unit]:
                    targets = tuple(torch.empty_like(t) for t in targets)
                    shares.append((unit, targets))
                x_u, a, b = saved[piece]
                if is_routed:
                    g_out = gather_rows(grad_out, token_index[start:end], backend)
                else:
                    g_out = pad_rows(grad_out[start:end], backend)
                g_h = matmul_nn(g_out, unit_down, backend)  # gradient w.r.t. the (weighted) activation
                silu_a = F.silu(a)
                h = silu_a * b
                if is_routed:
                    w = pad_rows(weights[start:end], backend)[:, None]
                    if need_w:
                        torch.sum(g_h[:n] * h[:n], dim=1, out=grad_w[start:end])
                    h.mul_(w)
                    g_h.mul_(w)
                if targets:
                    matmul_tn(g_out, h, backend, out=targets[0])
                g_a = torch.ops.aten.silu_backward(g_h * b, a)
                g_b = g_h.mul_(silu_a)
                if targets:
                    matmul_tn(g_a, x_u, backend, out=targets[1])
                    matmul_tn(g_b, x_u, backend, out=targets[2])
                if need_x:
                    matmul_nn_sum(g_a, unit_gate, g_b, unit_up, backend,
                                  out=sorted_grad_x[_buffer_rows(unit, start, end, routed, token_index)])
            return shares

        for unit, share in _run_pieces(run, ctx.plan):
            for grad, value in zip(unit_grads[unit], share):
                grad += value
        for unit in range(len(units)):
            if unit not in first_start:  # an expert that got no token still gets a (zero) gradient
                for grad in unit_grads[unit]:
                    grad.zero_()
        grad_x = F.embedding_bag(positions, sorted_grad_x, mode="sum") if need_x else None
        grad_down, grad_gate, grad_up = routed_grads or (None, None, None)
        shared_down_grad, shared_gate_grad, shared_up_grad = shared_grads or (None, None, None)
        return (grad_x, None, None, grad_w, None, grad_gate, grad_up, grad_down, shared_gate_grad, shared_up_grad,
                shared_down_grad, None)


def _units(gate, up, down, shared_gate, shared_up, shared_down) -> list[tuple[torch.Tensor, ...]]:
    """(gate, up, down) weights per unit: the routed experts, then the shared expert if there is one."""
    units = [(gate[e], up[e], down[e]) for e in range(gate.shape[0])]
    if shared_gate is not None:
        units.append((shared_gate, shared_up, shared_down))
    return units


def _sorted_rows(token_index: torch.Tensor, x: torch.Tensor, shared_gate: torch.Tensor | None) -> int:
    """Rows of the sorted buffers: one per routed (token, slot) pair, then one per token for the shared expert."""
    return token_index.shape[0] + (0 if shared_gate is None else x.shape[0])


def _buffer_rows(unit: int, start: int, end: int, routed: int, token_index: torch.Tensor) -> slice:
    """The rows of piece (unit, start, end) in the sorted buffers."""
    offset = 0 if unit < routed else token_index.shape[0]
    return slice(offset + start, offset + end)


def _starts(counts: list[int]) -> list[int]:
    """Row where each expert's block starts in the sorted order."""
    starts, total = [], 0
    for count in counts:
        starts.append(total)
        total += count
    return starts


# ------------------------------------------------------------------------------ CPU worker threads
Piece = tuple[int, int, int]  # (unit, start row, end row): see _LoopSwiGLUExperts
# Worker threads only pay off for large batches: each hand-off lets the caller's idle OpenMP threads spin
# while the workers want the cores (a few ms with libgomp's default; importing most_lightning shortens it,
# see openmp_env.py). One worker per 2**30 multiply-adds of one matmul over all rows (rows x H x width, routed
# and shared): the bench_moe.py shapes S and M (4096 tokens) get two threads, the `tiny` preset's layers stay
# on the OpenMP loop. Set it very large to never use workers.
MIN_MACS_PER_WORKER = 2**30
_pool: ThreadPoolExecutor | None = None


def _worker_pool(n_workers: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers < n_workers:
        _pool = ThreadPoolExecutor(n_workers, thread_name_prefix="most-experts")
    return _pool


def _forget_pool_after_fork() -> None:
    global _pool
    _pool = None  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _split_rows(counts: list[int], n_parts: int) -> list[list[Piece]]:
    """Cut the sorted rows into ``n_parts`` equal contiguous ranges, as pieces of experts. Equal row counts
    balance the threads even with few, unevenly loaded experts (at most n_parts - 1 experts get cut)."""
    total = sum(counts)
    bounds = [total * i // n_parts for i in range(n_parts + 1)]
    parts = []
    for low, high in zip(bounds, bounds[1:]):
        part = []
        for e, (start, count) in enumerate(zip(_starts(counts), counts)):
            if max(start, low) < min(start + count, high):
                part.append((e, max(start, low), min(start + count, high)))
        parts.append(part)
    return parts


def _plan(counts: list[int], n_tokens: int, macs_per_row: int, shared_macs_per_row: int,
          device: torch.device) -> list[list[Piece]]:
    """The pieces of each thread: the routed rows cut by _split_rows and, with a shared expert
    (shared_macs_per_row > 0), the tokens cut into as many equal ranges (unit len(counts)).

    One part (run on the OpenMP pool) off the CPU and for small batches; up to torch.get_num_threads() parts
    on the CPU for large ones (see MIN_MACS_PER_WORKER)."""
    macs = sum(counts) * macs_per_row + n_tokens * shared_macs_per_row
    n_parts = 1 if device.type != "cpu" else max(1, min(torch.get_num_threads(), macs // MIN_MACS_PER_WORKER))
    parts = _split_rows(counts, n_parts)
    if shared_macs_per_row:
        for i, part in enumerate(parts):
            start, end = n_tokens * i // n_parts, n_tokens * (i + 1) // n_parts
            if start < end:
                part.append((len(counts), start, end))
    return parts


def _run_single_threaded(run: Callable, pieces: list[Piece]):
    torch.set_num_threads(1)  # this thread only: OpenMP and MKL keep per-thread settings
    with torch.no_grad():
        return run(pieces)


def _run_pieces(run: Callable[[list[Piece]], list | None], plan: list[list[Piece]]) -> list:
    """run(part) for every part of ``plan``; returns the concatenation of the lists that the calls return.

    With several parts, each runs on a thread of its own (this one included) with one intra-op thread. Pieces
    write disjoint rows of the sorted buffers, so the threads share no output.
    """
    if len(plan) == 1:
        return run(plan[0]) or []
    previous = torch.get_num_threads()
    futures = [_worker_pool(len(plan) - 1).submit(_run_single_threaded, run, part) for part in plan[1:]]
    results = []
    try:
        results.append(_run_single_threaded(run, plan[0]))
    finally:
        for future in futures:  # wait for every worker (and re-raise its error) before the buffers are used
            results.append(future.result())
        # Last: set_num_threads also sets the default that new threads start with, which the workers changed.
        torch.set_num_threads(previous)
    return [item for result in results if result for item in result]


def _grouped_mm_experts(x, token_index, weights, counts, gate, up, down):
    """Same maths with F.grouped_mm and plain autograd (no host sync: offsets stay on the device)."""
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    x_sorted = x.index_select(0, token_index)
    a = F.grouped_mm(x_sorted, gate.transpose(1, 2), offs=offsets)
    b = F.grouped_mm(x_sorted, up.transpose(1, 2), offs=offsets)
    h = F.silu(a) * b * weights[:, None]
    y_sorted = F.grouped_mm(h, down.transpose(1, 2), offs=offsets)
    # index_add's backward hands grouped_mm a contiguous gradient (its backward fails on stride-0 ones).
    return torch.zeros_like(x).index_add(0, token_index, y_sorted)


class GroupedExperts(nn.Module):
    """``n_experts`` SwiGLU experts stored stacked like nn.Linear weights (checkpoint import is a stack()).

    gate_proj [E, I, H], up_proj [E, I, H], down_proj [E, H, I]. ``dispatch``: "loop", "grouped_mm", or
    "auto": grouped_mm for bf16/fp16 on CUDA GPUs of compute capability >= 8.0 (a fused kernel there, which
    needs rows of a multiple of 16 bytes), the loop everywhere else.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, n_experts: int, dispatch: Dispatch = "auto",
                 cpu_matmul: Backend = "auto"):
        super().__init__()
        if dispatch not in DISPATCHES:
            raise ValueError(f"expert dispatch {dispatch!r} is unknown; choose one of {DISPATCHES}")
        check_backend(cpu_matmul)
        self.hidden_size, self.intermediate_size, self.n_experts = hidden_size, intermediate_size, n_experts
        self.dispatch, self.cpu_matmul = dispatch, cpu_matmul
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
        if self.dispatch != "auto":
            return self.dispatch
        aligned = all(n * x.element_size() % 16 == 0 for n in (self.hidden_size, self.intermediate_size))
        if (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and aligned
                and torch.cuda.get_device_capability(x.device) >= (8, 0)):
            return "grouped_mm"
        return "loop"

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor,
                shared: SwiGLU | None = None) -> torch.Tensor:
        """x [N, H]; expert_indices [N, k] (distinct per row); expert_weights [N, k] -> [N, H]; plus
        ``shared(x)`` if the layer's shared experts are given (the loop runs them as one more unit of work and
        adds their output in the same pass as the routed outputs)."""
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"experts expect x of shape [N, {self.hidden_size}], got {tuple(x.shape)}")
        if expert_indices.shape != expert_weights.shape or expert_indices.shape[0] != x.shape[0]:
            raise ValueError(f"expert_indices {tuple(expert_indices.shape)} and expert_weights "
                             f"{tuple(expert_weights.shape)} must both be [N={x.shape[0]}, k]")
        if self.resolved_dispatch(x) == "grouped_mm":
            x_cast, _, token_index, weights, counts, gate, up, down = self._compute_inputs(
                x, expert_indices, expert_weights, ())
            out = _grouped_mm_experts(x_cast, token_index, weights, counts, gate, up, down)
            return out if shared is None else out + shared(x)
        shared_weights = () if shared is None else (shared.gate_proj.weight, shared.up_proj.weight,
                                                     shared.down_proj.weight)
        x, order, token_index, weights, counts, gate, up, down, *shared_weights = self._compute_inputs(
            x, expert_indices, expert_weights, shared_weights)
        counts = counts.tolist()
        shared_width = shared_weights[0].shape[0] if shared_weights else 0
        plan = _plan(counts, x.shape[0], x.shape[1] * gate.shape[1], x.shape[1] * shared_width, x.device)
        positions = sorted_positions(order, expert_indices.shape[1], shared=bool(shared_weights))
        backend = "onednn" if uses_onednn(self.cpu_matmul, x) else "torch"  # "auto" decided here, not in a worker
        return _LoopSwiGLUExperts.apply(x, token_index, positions, weights, plan, gate, up, down,
                                        *(shared_weights or (None, None, None)), backend)

    def _compute_inputs(self, x, expert_indices, expert_weights, shared_weights):
        """(x, order, token_index, sorted gate weights, counts, gate, up, down, *shared_weights): the tensors
        in the compute dtype (autocast's, else x's) and the (token, slot) pairs sorted by expert."""
        weights = (*self.stacked_weights(), *shared_weights)
        if torch.is_autocast_enabled(x.device.type):
            # Neither path is covered by autocast's op lists: cast by hand, as autocast does for nn.Linear.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, *weights = (t.to(dtype) for t in (x, *weights))
        elif any(w.dtype != x.dtype for w in weights):
            held = next(w.dtype for w in weights if w.dtype != x.dtype)
            raise TypeError(f"experts got {x.dtype} input but hold {held} weights; cast the module "
                            f"(experts.to({x.dtype})) or run under torch.autocast")
        order, token_index, counts = sort_by_expert(expert_indices, self.n_experts)
        sorted_weights = expert_weights.to(x.dtype).reshape(-1).index_select(0, order)
        return (x, order, token_index, sorted_weights, counts, *weights)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"n_experts={self.n_experts}, dispatch={self.dispatch!r}")
