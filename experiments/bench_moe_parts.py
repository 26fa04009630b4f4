"""Where the MoE layer's excess over a dense SwiGLU comes from: its parts timed side by side (forward + backward).

Rows, interleaved repetition by repetition in one process (bench_moe.py's timing and malloc settings):
the dense SwiGLU of equal active FLOPs (width top_k * I + shared), the whole MoE layer, and its parts alone:
the router, the routed experts (on a fixed routing), the shared expert, and a dense SwiGLU of the routed experts'
FLOPs (width top_k * I). Read: layer - (router + experts + shared) = the glue (sorting, adds, gradient
accumulation; negative where the layer does better than its parts alone: the loop dispatch runs the shared
expert inside its worker threads and adds its output in the routed outputs' pass); experts / dense of their FLOPs
= the dispatch's own overhead; shared + dense of the routed FLOPs against the full dense = the price of two
narrower layers instead of one.
A second table times the products alone at one thread: one [N, H] x [H, top_k * I] product against E products of
one expert's rows (N * top_k / E) with the same FLOPs, the shape-efficiency share of the experts' overhead.

    python experiments/bench_moe_parts.py                      # shape S, cpu_matmul=auto (the faster on this host)
    python experiments/bench_moe_parts.py --cpu-matmul torch   # torch's matmul (the issue's conditions)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install
import most_lightning  # noqa: E402,F401  (before torch: sets the OpenMP defaults, most_lightning/openmp_env.py)
import torch  # noqa: E402

from bench_moe import (SHAPES, Row, dense_swiglu, keep_freed_memory, most_moe_layer, print_table,  # noqa: E402
                       run_interleaved)
from most_lightning.model.gemm import matmul_nt  # noqa: E402
from most_lightning.model.matmul_choice import auto_backend  # noqa: E402


def layer_rows(shape: str, tokens: int, seq_len: int, cpu_matmul: str) -> list[Row]:
    hidden, experts, width, top_k, shared = SHAPES[shape]
    torch.manual_seed(0)
    x = torch.randn(tokens // seq_len, seq_len, hidden)
    grad = torch.randn_like(x)
    modality = torch.zeros(x.shape[:2], dtype=torch.long)
    modality[:, seq_len // 2:] = 1
    layer = most_moe_layer(hidden, experts, width, top_k, shared, "loop", "vanilla", cpu_matmul).train()
    with torch.no_grad():
        routing = layer.gate(x, modality)
    inp = x.clone().requires_grad_()
    flat = x.reshape(-1, hidden).clone().requires_grad_()
    weights = routing.weights.clone().requires_grad_()

    def plain(module):
        def step():
            module.zero_grad(set_to_none=True)
            inp.grad = None
            module(inp).backward(grad)
        return step

    def whole_layer():
        layer.zero_grad(set_to_none=True)
        inp.grad = None
        out, r = layer(inp, modality)
        torch.autograd.backward([out, r.aux_loss], [grad, torch.ones_like(r.aux_loss)])

    def router():
        layer.zero_grad(set_to_none=True)
        inp.grad = None
        r = layer.gate(inp, modality)
        torch.autograd.backward([r.weights, r.aux_loss], [torch.ones_like(r.weights), torch.ones_like(r.aux_loss)])

    def routed_experts():
        layer.zero_grad(set_to_none=True)
        flat.grad = weights.grad = None
        layer.experts(flat, routing.indices, weights).backward(grad.reshape(-1, hidden))

    return [Row(f"dense SwiGLU width {top_k * width + shared}",
                plain(dense_swiglu(hidden, top_k * width + shared, cpu_matmul))),
            Row("MoE layer (loop / vanilla)", whole_layer),
            Row("  router", router),
            Row(f"  routed experts ({experts} x {width}, top-{top_k})", routed_experts),
            Row(f"  shared expert (width {shared})", plain(layer.shared_experts)),
            Row(f"dense SwiGLU width {top_k * width} (the routed FLOPs)", plain(dense_swiglu(hidden, top_k * width,
                                                                                             cpu_matmul)))]


def product_rows(shape: str, tokens: int, cpu_matmul: str) -> list[Row]:
    hidden, experts, width, top_k, _ = SHAPES[shape]
    rows_per_expert = tokens * top_k // experts
    x = torch.randn(tokens, hidden)
    w = torch.randn(top_k * width, hidden)
    x_e = torch.randn(rows_per_expert, hidden)
    w_e = torch.randn(experts, width, hidden)
    return [Row(f"one product {tokens} x {hidden} x {top_k * width}", lambda: matmul_nt(x, w, cpu_matmul)),
            Row(f"{experts} products {rows_per_expert} x {hidden} x {width}",
                lambda: [matmul_nt(x_e, w_e[e], cpu_matmul) for e in range(experts)])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="S")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-matmul", choices=("auto", "onednn", "torch"), default="auto")
    parser.add_argument("--quick", action="store_true", help="smoke run: 512 tokens, 2 repetitions")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.seq_len, args.reps = 512, 256, 2
    note = "malloc keeps freed memory" if keep_freed_memory() else "default malloc"
    torch.set_num_threads(args.threads)
    if args.cpu_matmul == "auto":
        args.cpu_matmul = auto_backend()  # named in the tables; the product rows at one thread use it too
    rows = layer_rows(args.shape, args.tokens, args.seq_len, args.cpu_matmul)
    run_interleaved(rows, args.reps, quiet=True)
    print_table(f"shape {args.shape}, {args.tokens} tokens, forward + backward, {args.threads} threads, "
                f"cpu_matmul={args.cpu_matmul}", rows, rows[0].name,
                note=f"ratios to the first row; medians of {args.reps} interleaved repetitions; {note}")
    parts = sum(statistics.median(r.times) for r in rows[2:5])
    print(f"glue (layer - router - experts - shared): {(statistics.median(rows[1].times) - parts) * 1e3:+.1f} ms")
    torch.set_num_threads(1)
    products = product_rows(args.shape, args.tokens, args.cpu_matmul)
    run_interleaved(products, args.reps, quiet=True)
    print_table(f"products alone, one thread, cpu_matmul={args.cpu_matmul}", products, products[0].name,
                note=f"same FLOPs; medians of {args.reps} interleaved repetitions")


if __name__ == "__main__":
    main()
