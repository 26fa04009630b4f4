"""fp32 linear layers on the CPU: oneDNN (most_lightning.model.gemm) against torch's default matmul (MKL).

Times forward + backward (three matmuls: y = x W^T, dx = dy W, dW = dy^T x) of one linear layer at each
matmul shape of the `tiny` preset's training step (batch 8 x 256 = 2048 tokens), the two backends
interleaved repetition by repetition in one process, and prints the multiply-add rate of each and their ratio.

    python experiments/bench_cpu_matmul.py                       # 1 thread, CPU time of that thread
    python experiments/bench_cpu_matmul.py --threads 2 --clock wall
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install
import most_lightning  # noqa: E402,F401  (before torch: sets the OpenMP defaults, most_lightning/openmp_env.py)
import torch  # noqa: E402

from most_lightning.model.gemm import linear, uses_onednn  # noqa: E402
from most_lightning.model.matmul_choice import CACHE_FILE, auto_backend, cache_dir  # noqa: E402

TOKENS = 2048
# (layer, rows, in features, out features) of the tiny preset (hidden 256, 4 heads, MLA, 8 experts x 128 top-2)
SHAPES = [
    ("q_proj", TOKENS, 256, 192),
    ("kv_a_proj_with_mqa", TOKENS, 256, 80),
    ("kv_b_proj", TOKENS, 64, 256),
    ("o_proj", TOKENS, 128, 256),
    ("dense gate / up", TOKENS, 256, 768),
    ("dense down", TOKENS, 768, 256),
    ("one expert's gate (512 rows)", 512, 256, 128),
    ("one expert's down (512 rows)", 512, 128, 256),
    ("LM head", TOKENS, 256, 4096),
]
BACKENDS = ("torch", "onednn")


def step(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, backend: str) -> None:
    x.grad = weight.grad = None
    linear(x, weight, backend=backend).backward(grad)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("thread", "wall"), default="thread",
                        help="thread: CPU seconds of this thread (needs --threads 1), blind to other processes")
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread's CPU time: use it with --threads 1")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    probe = torch.zeros(1, 1)
    if not uses_onednn("onednn", probe):
        sys.exit("this torch build has no usable oneDNN fp32 matmul: nothing to compare")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}\ntorch {torch.__version__}, {args.threads} thread(s), fp32, forward + backward, "
          f"{args.clock} clock, medians of {args.reps} interleaved repetitions")

    torch.manual_seed(0)
    lines, speedups, total = [], {}, dict.fromkeys(BACKENDS, 0.0)
    for name, rows, n_in, n_out in SHAPES:
        x = torch.randn(rows, n_in, requires_grad=True)
        weight = torch.randn(n_out, n_in, requires_grad=True)
        grad = torch.randn(rows, n_out)
        times = {b: [] for b in BACKENDS}
        for backend in BACKENDS:
            step(x, weight, grad, backend)  # warm-up
        for _ in range(args.reps):
            for backend in BACKENDS:
                start = clock()
                step(x, weight, grad, backend)
                times[backend].append(clock() - start)
        median = {b: statistics.median(t) for b, t in times.items()}
        gmacs = 3 * rows * n_in * n_out / 1e9
        speedups[name] = median["torch"] / median["onednn"]
        for b in BACKENDS:
            total[b] += median[b]
        lines.append((name, f"{rows} x {n_in} -> {n_out}", f"{median['torch'] * 1e3:.2f}",
                      f"{gmacs / median['torch']:.0f}", f"{median['onednn'] * 1e3:.2f}",
                      f"{gmacs / median['onednn']:.0f}", f"{speedups[name]:.2f}x"))
    lines.append(("all shapes above, once each", "", f"{total['torch'] * 1e3:.2f}", "",
                  f"{total['onednn'] * 1e3:.2f}", "", f"{total['torch'] / total['onednn']:.2f}x"))

    from rich.console import Console
    from rich.table import Table

    table = Table(title="linear layer forward + backward: torch (MKL) vs oneDNN")
    for i, column in enumerate(("layer", "shape", "torch ms", "torch GMAC/s", "oneDNN ms", "oneDNN GMAC/s",
                                "speed-up")):
        table.add_column(column, justify="left" if i < 2 else "right")
    for line in lines:
        table.add_row(*line)
    Console(width=140).print(table)
    print(f"model.cpu_matmul=auto uses {auto_backend()} on this host at {torch.get_num_threads()} thread(s) "
          f"(decided on a whole tiny training step, stored in {cache_dir() / CACHE_FILE})")
    return speedups


if __name__ == "__main__":
    main()
