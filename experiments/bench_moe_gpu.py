"""MoE layer speed on a CUDA GPU: our dispatch paths against transformers' DeepseekV2Moe and a dense SwiGLU
with the same active FLOPs, bf16 weights and activations, forward + backward.

Same rows and shapes as bench_moe.py (the CPU benchmark) plus `lite`, one DeepSeek-V2-Lite MoE layer. All rows
run side by side, interleaved repetition by repetition; each repetition is timed with CUDA events around
``--inner`` steps.

    python experiments/bench_moe_gpu.py                  # shapes S, M, lite
    python experiments/bench_moe_gpu.py --shapes lite --tokens 16384
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe  # noqa: E402  (the CPU benchmark's row builders and table)

bench_moe.SHAPES.setdefault("lite", (2048, 64, 1408, 6, 2816))  # DeepSeek-V2-Lite: 64 x 1408, top-6, 2 shared


def cuda_timed(step, inner: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / inner


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="S,M,lite")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--inner", type=int, default=5, help="steps per timed repetition")
    parser.add_argument("--rows", default=None, help="only rows whose name contains one of these (comma-separated)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe_gpu.py needs a CUDA GPU (use experiments/bench_moe.py on the CPU)")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16, forward+backward, {args.tokens} tokens")
    results = {}
    torch.set_default_device("cuda")
    torch.set_default_dtype(torch.bfloat16)
    try:
        for shape in args.shapes.split(","):
            rows = bench_moe.build_rows(shape, args.tokens, args.seq_len, args.rows)
            for row in rows:  # warm-up: kernel selection, allocator
                for _ in range(3):
                    row.step()
            torch.cuda.synchronize()
            for _ in range(args.reps):
                for row in rows:
                    row.times.append(cuda_timed(row.step, args.inner))
            hidden, experts, width, top_k, shared = bench_moe.SHAPES[shape]
            title = (f"GPU shape {shape}: hidden {hidden}, {experts} experts x {width}, top-{top_k}, shared {shared}, "
                     f"{args.tokens} tokens, bf16")
            results[shape] = bench_moe.print_table(title, rows, rows[0].name,
                                                   note=f"ratios to the dense row; medians of {args.reps} reps")
    finally:
        torch.set_default_dtype(torch.float32)
        torch.set_default_device("cpu")
    return results


if __name__ == "__main__":
    main()
