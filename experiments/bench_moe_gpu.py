"""MoE layer speed on a CUDA GPU: our dispatch paths against transformers' DeepseekV2Moe and a dense SwiGLU
with the same active FLOPs, forward + backward, in two precisions:

- ``bf16-mixed``: fp32 weights and inputs under ``torch.autocast(bfloat16)``, what training with
  ``precision: bf16-mixed`` runs (the experts must take grouped_mm there too);
- ``bf16``: bf16 weights and activations.

Same rows and shapes as bench_moe.py (the CPU benchmark) plus ``lite``, one DeepSeek-V2-Lite MoE layer. All rows
run side by side, interleaved repetition by repetition; each repetition is timed with CUDA events around
``--inner`` steps. A parts table then times the pieces of our layer one by one (router, sort by expert, gather,
grouped experts, scatter-add, shared expert), forward + backward each, so the biggest cost is visible; with
``--profile DIR`` one layer step is also recorded with torch.profiler (a Chrome trace, and the top kernels).

    python experiments/bench_moe_gpu.py                          # shapes S, M, lite; both precisions
    python experiments/bench_moe_gpu.py --shapes lite --tokens 16384 --precisions bf16-mixed
    python experiments/bench_moe_gpu.py --shapes lite --profile experiments/results/moe_trace
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe  # noqa: E402  (the CPU benchmark's row builders and table)

bench_moe.SHAPES.setdefault("lite", (2048, 64, 1408, 6, 2816))  # DeepSeek-V2-Lite: 64 x 1408, top-6, 2 shared
PRECISIONS = {"bf16-mixed": (torch.float32, torch.bfloat16), "bf16": (torch.bfloat16, None)}  # weights, autocast


def cuda_timed(step: Callable[[], object], inner: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / inner


def part_rows(shape: str, tokens: int, seq_len: int, autocast: torch.dtype | None) -> list[bench_moe.Row]:
    """Our layer's pieces, each forward + backward on its own inputs (those of one real routing)."""
    from most_lightning.model.experts import grouped_mm_swiglu, sort_by_expert

    hidden, experts, width, top_k, shared = bench_moe.SHAPES[shape]
    layer = bench_moe.most_moe_layer(hidden, experts, width, top_k, shared, "grouped_mm", "vanilla").train()
    compute = autocast or torch.get_default_dtype()
    x = torch.randn(tokens // seq_len, seq_len, hidden)
    modality = torch.zeros(x.shape[:2], dtype=torch.long)
    modality[:, seq_len // 2:] = 1
    with torch.no_grad():
        routing = layer.gate(x, modality)
    flat = x.reshape(-1, hidden).to(compute)
    order, token_index, counts = sort_by_expert(routing.indices, experts)
    gate, up, down = (w.detach().to(compute).requires_grad_() for w in layer.experts.stacked_weights())
    x_leaf = flat.clone().requires_grad_()
    x_sorted = flat.index_select(0, token_index).requires_grad_()
    scale = routing.weights.to(compute).reshape(-1).index_select(0, order).requires_grad_()
    y_sorted = torch.randn(token_index.numel(), hidden, dtype=compute, requires_grad=True)
    grad = torch.randn_like(flat)
    mode = dict(device_type="cuda", dtype=autocast or torch.bfloat16, enabled=autocast is not None)

    def router():
        with torch.autocast(**mode):
            r = layer.gate(x, modality)
        (r.weights.float().sum() + sum(r.aux_losses.values(), torch.zeros(()))).backward()

    def sort():
        sort_by_expert(routing.indices, experts)

    def gather():
        x_leaf.index_select(0, token_index).backward(x_sorted.detach())

    def grouped():
        grouped_mm_swiglu(x_sorted, counts, gate, up, down, scale).backward(y_sorted.detach())

    def scatter():
        torch.zeros_like(flat).index_add_(0, token_index, y_sorted).backward(grad)

    def shared_expert():
        with torch.autocast(**mode):
            out = layer.shared_experts(x_leaf)
        out.backward(grad.to(out.dtype))

    def whole():
        layer.zero_grad(set_to_none=True)
        with torch.autocast(**mode):
            out, r = layer(x, modality)
        torch.autograd.backward([out, r.aux_loss], [grad.view_as(out).to(out.dtype), torch.ones_like(r.aux_loss)])

    return [bench_moe.Row(name, fn) for name, fn in (
        ("whole MoELayer (grouped_mm / vanilla)", whole), ("router: gate, softmax, top-k, balance loss", router),
        ("sort by expert (argsort + counts)", sort), ("gather rows (index_select)", gather),
        ("experts: 3 grouped_mm + SwiGLU", grouped), ("scatter-add rows (index_add)", scatter),
        ("shared expert (dense SwiGLU)", shared_expert))]


def profile_layer(shape: str, tokens: int, seq_len: int, autocast: torch.dtype | None, directory: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    row = part_rows(shape, tokens, seq_len, autocast)[0]
    for _ in range(3):
        row.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        row.step()
        torch.cuda.synchronize()
    directory.mkdir(parents=True, exist_ok=True)
    trace = directory / f"moe_layer_{shape}.json"
    prof.export_chrome_trace(str(trace))
    print(f"\nprofile of one MoE layer step, shape {shape} (trace: {trace}):")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=70))


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="S,M,lite")
    parser.add_argument("--precisions", default="bf16-mixed,bf16", help="comma-separated subset of "
                        + ",".join(PRECISIONS))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--inner", type=int, default=5, help="steps per timed repetition")
    parser.add_argument("--rows", default=None, help="only rows whose name contains one of these (comma-separated)")
    parser.add_argument("--no-parts", action="store_true", help="skip the table of our layer's pieces")
    parser.add_argument("--profile", type=Path, default=None, help="directory for a profiler trace of one layer step")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe_gpu.py needs a CUDA GPU (use experiments/bench_moe.py on the CPU)")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, forward+backward, {args.tokens} tokens")
    results = {}
    torch.set_default_device("cuda")
    try:
        for precision in args.precisions.split(","):
            weights, autocast = PRECISIONS[precision]
            torch.set_default_dtype(weights)
            for shape in args.shapes.split(","):
                tables = [("layers", bench_moe.build_rows(shape, args.tokens, args.seq_len, args.rows, autocast))]
                if not args.no_parts:
                    tables.append(("parts of our layer", part_rows(shape, args.tokens, args.seq_len, autocast)))
                for what, rows in tables:
                    for row in rows:  # warm-up: kernel selection, allocator
                        for _ in range(3):
                            row.step()
                    torch.cuda.synchronize()
                    for _ in range(args.reps):
                        for row in rows:
                            row.times.append(cuda_timed(row.step, args.inner))
                    hidden, experts, width, top_k, shared = bench_moe.SHAPES[shape]
                    title = (f"GPU {what}, shape {shape}: hidden {hidden}, {experts} experts x {width}, top-{top_k}, "
                             f"shared {shared}, {args.tokens} tokens, {precision}")
                    key = f"{shape} {precision} {what}"
                    results[key] = bench_moe.print_table(title, rows, rows[0].name,
                                                         note=f"ratios to the first row; medians of {args.reps} reps")
                if args.profile is not None:
                    profile_layer(shape, args.tokens, args.seq_len, autocast, args.profile / precision)
    finally:
        torch.set_default_dtype(torch.float32)
        torch.set_default_device("cpu")
    return results


if __name__ == "__main__":
    main()
