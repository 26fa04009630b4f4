"""Where an MoE layer's forward + backward spends its time, by operator (torch.profiler, CPU, one thread).

The profiler sees only the calling thread, so the experts' worker threads are switched off here (the work per
thread is the same; bench_moe.py measures the threaded layer). Prints per-step milliseconds of the matrix
products against everything else, then the profiler's table.

    python experiments/profile_moe_layer.py                       # shape S, oneDNN matmuls
    python experiments/profile_moe_layer.py --cpu-matmul torch --shape M
    python experiments/profile_moe_layer.py --part experts        # the routed experts alone
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "gpuGetDeviceCount failed" error lines on CPU-only machines

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install
import most_lightning  # noqa: E402,F401  (before torch: sets the OpenMP defaults, most_lightning/openmp_env.py)
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import most_lightning.model.experts as experts_module  # noqa: E402
from bench_moe import SHAPES, keep_freed_memory, most_moe_layer  # noqa: E402

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise", "aten::_grouped_mm")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="S")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--cpu-matmul", choices=("auto", "onednn", "torch"), default="auto")
    parser.add_argument("--router", default="vanilla")
    parser.add_argument("--part", choices=("layer", "experts"), default="layer",
                        help="the whole MoE layer (router + experts + shared) or the routed experts alone")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20, help="operators shown in the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_memory()
    experts_module.MIN_MACS_PER_WORKER = 2**62  # everything on this (profiled) thread
    hidden, experts, width, top_k, shared = SHAPES[args.shape]
    torch.manual_seed(0)
    layer = most_moe_layer(hidden, experts, width, top_k, shared, "loop", args.router, args.cpu_matmul).train()
    x = torch.randn(1, args.tokens, hidden, requires_grad=True)
    grad = torch.randn(1, args.tokens, hidden)
    modality = torch.zeros(1, args.tokens, dtype=torch.long)
    modality[:, args.tokens // 2:] = 1
    with torch.no_grad():
        routing = layer.gate(x, modality)
    weights = routing.weights.clone().requires_grad_()

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        if args.part == "experts":
            layer.experts(x.view(-1, hidden), routing.indices, weights).backward(grad.view(-1, hidden))
            return
        out, step_routing = layer(x, modality)
        torch.autograd.backward([out, step_routing.aux_loss], [grad, torch.ones_like(step_routing.aux_loss)])

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / args.steps / 1e3
    print(f"shape {args.shape}, {args.tokens} tokens, {args.part}, cpu_matmul={args.cpu_matmul}, 1 thread: "
          f"{total:.1f} ms per forward + backward, matrix products {matmul:.1f} ms ({matmul / total:.0%}), "
          f"everything else {total - matmul:.1f} ms")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return {"total_ms": total, "matmul_ms": matmul}


if __name__ == "__main__":
    main()
