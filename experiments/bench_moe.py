"""MoE layer speed against a dense SwiGLU with the same active FLOPs (forward + backward, CPU by default).

All rows run side by side in one process, interleaved repetition by repetition, so that drifts in machine
speed hit every row alike. On a shared machine, a repetition during which other processes used the CPUs is
re-run (up to --retries times) and the table says how many stayed contended. glibc's malloc is told to keep
freed memory (``keep_freed_memory``), so that no row pays page faults whose number depends on the rows beside it;
the table shows each row's page faults per step.

    python experiments/bench_moe.py            # shapes S and M, 2 threads
    python experiments/bench_moe.py --quick    # smoke run: shape S, 512 tokens, 2 repetitions
    python experiments/bench_moe.py --threads 1 --clock thread  # CPU time of the one compute thread: on a
        # machine shared with other jobs, wall time at 2 threads mostly measures OpenMP threads waiting for
        # descheduled partners

Rows: dense SwiGLU of width top_k * I + shared width; our MoELayer (router + GroupedExperts + shared expert)
with each expert dispatch and router; transformers' DeepseekV2Moe with its eager and grouped_mm experts.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import resource
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install
import torch  # noqa: E402
from torch import nn  # noqa: E402


SHAPES = {
    # name: (hidden, experts, expert width, top_k, shared width)
    "S": (512, 16, 256, 4, 512),
    "M": (1024, 64, 352, 6, 704),
    "tiny": (256, 8, 128, 2, 128),  # the MoE layers of the `tiny` preset (bench_model_step.py)
}


# ----------------------------------------------------------------------------------------------- timing
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters from glibc's malloc.h


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process instead of handing it back to the kernel.

    By default, buffers above a moving threshold (up to 32 MiB) are mmap-ed fresh and freed pages go back to the
    kernel, so a row that allocates large buffers pays a page fault per 4 KiB page on every step, and how many
    depends on what the OTHER rows allocated before it (they move the threshold). Measured here at shape S: the
    dense SwiGLU row paid 12,000-37,000 faults per step depending on its neighbours, the transformers model-step
    rows 16,000-38,000 (~30 ms); our layers ~0. Kept memory turns the tables into comparisons of compute.
    Returns False where the C library is not glibc (settings unchanged)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError, TypeError):  # no libc found, or one without mallopt (musl, macOS)
        return False


def malloc_note(kept: bool) -> str:
    return ("malloc keeps freed memory (--default-malloc to leave it)" if kept
            else "malloc settings left alone: rows may pay page faults that depend on their neighbours")


def page_faults() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _busy_cpu_seconds() -> float:
    """CPU seconds the machine spent busy (user, system, irq, softirq, steal). Time of niced processes is left
    out: the scheduler lets them run only when nothing else wants the CPUs, so they barely slow us down."""
    with open("/proc/stat") as stat:
        user, _nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in stat.readline().split()[1:9])
    return (user + system + irq + softirq + steal) / _CLOCK_TICKS


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds of fn(), CPU seconds that OTHER processes used meanwhile)."""
    busy0, own0, t0 = _busy_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    others = (_busy_cpu_seconds() - busy0) - (sum(os.times()[:2]) - own0)
    return wall, max(others, 0.0)


@dataclass
class Row:
    name: str
    step: Callable[[], object]
    times: list[float] = field(default_factory=list)
    contended: int = 0
    faults: list[int] = field(default_factory=list)  # page faults of the process during each timed step


def wait_for_quiet(max_wait: float, window: float = 1.0) -> float:
    """Sleep until other processes leave the CPUs idle for one window, at most ``max_wait`` seconds; returns
    the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < max_wait:
        _, others = timed(lambda: time.sleep(window))
        if others < 0.1 * window:
            break
    return time.monotonic() - start


def run_interleaved(rows: list[Row], reps: int, warmup: int = 1, retries: int = 3, wait_budget: float = 300.0,
                    quiet: bool = False) -> None:
    """Time each row once per repetition, rows interleaved. A repetition disturbed by other processes (they
    used more than 5% of one CPU meanwhile, jiffy resolution allowing) is re-run, up to ``retries`` times,
    after waiting for a quiet machine (``wait_budget`` seconds of waiting in all); the last try counts either
    way and is reported as contended."""
    for row in rows:
        for _ in range(warmup):
            row.step()
    for rep in range(reps):
        for row in rows:
            for attempt in range(retries + 1):
                faults = page_faults()
                wall, others = timed(row.step)
                faults = page_faults() - faults
                clean = others <= 0.05 * wall + 0.02
                if clean or attempt == retries:
                    break
                wait_budget -= wait_for_quiet(min(wait_budget, 60.0))
            row.times.append(wall)
            row.faults.append(faults)
            row.contended += not clean
        if not quiet:
            print(f"  rep {rep + 1}/{reps} done", file=sys.stderr, flush=True)


def run_interleaved_thread_clock(rows: list[Row], reps: int, warmup: int = 1, quiet: bool = False) -> None:
    """Like run_interleaved, timing each step by this thread's CPU time (with one torch thread, all of the
    compute runs on it): nearly blind to other processes on a shared machine."""
    for row in rows:
        for _ in range(warmup):
            row.step()
    for rep in range(reps):
        for row in rows:
            faults, start = page_faults(), time.thread_time()
            row.step()
            row.times.append(time.thread_time() - start)
            row.faults.append(page_faults() - faults)
        if not quiet:
            print(f"  rep {rep + 1}/{reps} done", file=sys.stderr, flush=True)


def print_table(title: str, rows: list[Row], baseline: str, note: str = "") -> dict[str, float]:
    """Median/min per row, ratios of medians to the baseline row and, where recorded, median page faults per
    step; returns {name: median ratio}."""
    base = next(r for r in rows if r.name == baseline)
    base_med, base_min = statistics.median(base.times), min(base.times)
    ratios, lines = {}, []
    for row in rows:
        med, best = statistics.median(row.times), min(row.times)
        ratios[row.name] = med / base_med
        faults = f"{statistics.median(row.faults):.0f}" if row.faults else "-"
        lines.append((row.name, f"{med * 1e3:.1f}", f"{best * 1e3:.1f}", f"{med / base_med:.3f}x",
                      f"{best / base_min:.3f}x", f"{row.contended}/{len(row.times)}", faults))
    header = ("row", "median ms", "min ms", "ratio (median)", "ratio (min)", "contended", "faults/step")
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, caption=note or None)
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for line in lines:
            table.add_row(*line)
        Console(width=140).print(table)
    except ImportError:
        print(title)
        for line in [header, *lines]:
            print(f"{line[0]:44s}" + "".join(f"{c:>16s}" for c in line[1:]))
        if note:
            print(note)
    return ratios


# ----------------------------------------------------------------------------------------------- rows
def dense_swiglu(hidden: int, width: int) -> nn.Module:
    from most_lightning.model.experts import SwiGLU

    return SwiGLU(hidden, width)  # three nn.Linear layers: the baseline


def most_moe_layer(hidden: int, experts: int, width: int, top_k: int, shared: int, dispatch: str, router: str):
    from most_lightning.model import MoSTConfig, RouterConfig
    from most_lightning.model.moe import MoELayer

    if shared % width:
        raise ValueError(f"shared width {shared} must be a multiple of the expert width {width}")
    config = MoSTConfig(hidden_size=hidden, moe_intermediate_size=width, n_routed_experts=experts, top_k=top_k,
                        n_shared_experts=shared // width, expert_dispatch=dispatch, num_layers=2,
                        router=RouterConfig(name=router))
    layer = MoELayer(config)
    layer.experts.reset_parameters(std=0.02)
    return layer


def transformers_moe(hidden: int, experts: int, width: int, top_k: int, shared: int, implementation: str):
    from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    config = DeepseekV2Config(hidden_size=hidden, moe_intermediate_size=width, n_routed_experts=experts,
                              num_experts_per_tok=top_k, n_shared_experts=shared // width, topk_method="greedy",
                              norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1,
                              hidden_act="silu", mlp_bias=False)
    config._experts_implementation = implementation
    layer = DeepseekV2Moe(config)
    with torch.no_grad():  # transformers leaves these uninitialised (router: zeros) outside from_pretrained
        for param in layer.parameters():
            nn.init.normal_(param, std=0.02)
    return layer


def build_rows(shape: str, tokens: int, seq_len: int, rows_filter: str | None,
               autocast_dtype: torch.dtype | None = None) -> list[Row]:
    """One forward + backward closure per row. ``autocast_dtype``: run the forwards under autocast (the modules
    keep the default dtype's weights, as in mixed-precision training)."""
    hidden, experts, width, top_k, shared = SHAPES[shape]
    torch.manual_seed(0)
    batch = tokens // seq_len
    x = torch.randn(batch, seq_len, hidden)
    grad = torch.randn(batch, seq_len, hidden)
    modality = torch.zeros(batch, seq_len, dtype=torch.long)
    modality[:, seq_len // 2:] = 1  # half text, half audio tokens
    device = x.device.type

    def make_step(module: nn.Module, kind: str) -> Callable[[], None]:
        inp = x.clone().requires_grad_()

        def step() -> None:
            module.zero_grad(set_to_none=True)
            inp.grad = None
            with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                result = module(inp, modality) if kind == "most" else module(inp)
            if kind == "most":
                out, routing = result
                outputs, grads = [out], [grad]
                if routing.aux_loss is not None:
                    outputs.append(routing.aux_loss)
                    grads.append(torch.ones_like(routing.aux_loss))
                torch.autograd.backward(outputs, [g.to(o.dtype) for o, g in zip(outputs, grads)])
            else:
                result.backward(grad.to(result.dtype))

        return step

    builders: list[tuple[str, Callable[[], nn.Module], str]] = [
        (f"dense SwiGLU width {top_k * width + shared}",
         lambda: dense_swiglu(hidden, top_k * width + shared), "plain"),
    ]
    for dispatch in ("loop", "grouped_mm"):
        for router in ("vanilla", "modality_aware"):
            builders.append((f"MoST MoELayer {dispatch} / {router}",
                             lambda d=dispatch, r=router: most_moe_layer(hidden, experts, width, top_k, shared, d, r),
                             "most"))
    for impl in ("eager", "grouped_mm"):
        builders.append((f"transformers DeepseekV2Moe {impl}",
                         lambda i=impl: transformers_moe(hidden, experts, width, top_k, shared, i), "plain"))
    rows = []
    for name, build, kind in builders:
        if rows_filter and not (name.startswith("dense") or any(f in name for f in rows_filter.split(","))):
            continue
        module = build().train()
        rows.append(Row(name, make_step(module, kind)))
    return rows


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=None, help="comma-separated subset of " + ",".join(SHAPES) +
                        " (default: S,M; S with --quick)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=None, help="repetitions per row (default: S 15, M 9)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--retries", type=int, default=3, help="re-runs of a repetition disturbed by other processes")
    parser.add_argument("--wait-budget", type=float, default=300.0,
                        help="seconds to wait in all for a quiet machine before re-running disturbed repetitions")
    parser.add_argument("--rows", default=None, help="only rows whose name contains one of these (comma-separated)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="thread: CPU seconds of the calling thread (needs --threads 1), blind to other processes")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc settings alone (see keep_freed_memory)")
    parser.add_argument("--quick", action="store_true", help="smoke run: shape S, 512 tokens, 2 repetitions")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.seq_len, args.reps, args.retries = 512, 256, 2, 0
        args.shapes = args.shapes or "S"
    args.shapes = args.shapes or "S,M"
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread's CPU time: use it with --threads 1")
    torch.set_num_threads(args.threads)
    kept = not args.default_malloc and keep_freed_memory()
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}\ntorch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"forward+backward, {args.tokens} tokens; {malloc_note(kept)}")
    results = {}
    for shape in args.shapes.split(","):
        hidden, experts, width, top_k, shared = SHAPES[shape]
        rows = build_rows(shape, args.tokens, args.seq_len, args.rows)
        reps = args.reps or (15 if shape == "S" else 9)
        if args.clock == "thread":
            run_interleaved_thread_clock(rows, reps, quiet=args.quick)
        else:
            run_interleaved(rows, reps, retries=args.retries, wait_budget=args.wait_budget, quiet=args.quick)
        title = (f"shape {shape}: hidden {hidden}, {experts} experts x {width}, top-{top_k}, shared {shared}, "
                 f"{args.tokens} tokens")
        results[shape] = print_table(title, rows, rows[0].name,
                                     note=f"ratios to the dense row; medians of {reps} interleaved repetitions"
                                     + ("; CPU time of the compute thread" if args.clock == "thread" else "; wall time"))
    for shape, ratios in results.items():
        ours = {k: v for k, v in ratios.items() if k.startswith("MoST")}
        print(f"{shape}: " + ", ".join(f"{k.removeprefix('MoST MoELayer ')} {v:.3f}x" for k, v in ours.items()))
    return results


if __name__ == "__main__":
    main()
