"""Whole-model training step at DeepSeek-V2-Lite width: ours against transformers' DeepseekV2ForCausalLM and a
dense model of the same active FLOPs, bf16-mixed (fp32 weights, autocast bf16), AdamW, on a CUDA GPU.

Model: hidden 2048, MLA (kv_lora_rank 512, qk 128+64, v 128, 16 heads), layer 0 dense (10944), then MoE layers
of 64 experts x 1408, top-6, 2 shared experts (one SwiGLU of 2816), vocab 102400; ``--layers`` layers in all
(default 4: the dense layer + 3 MoE layers, ~2.2B parameters, ~36 GB of weights, gradients and AdamW state).
Rows, each built, timed and freed in turn (one model on the GPU at a time), all on the same batch:

- ours, vanilla and modality_aware routers, as MoSTLitModule trains (chunked LM-head loss, fused AdamW);
- transformers DeepseekV2ForCausalLM on the same config (sdpa attention, ``labels=`` loss), with its eager
  experts and with its grouped_mm experts, torch AdamW (fused);
- dense: our model with every feed-forward a SwiGLU of width top_k x 1408 + 2816 = 11264, the MoE layers'
  active width (layer 0 becomes 3% wider than 10944).

MFU = model FLOPs per step / (step seconds x the GPU's dense bf16 peak), with
model FLOPs = 6 x active parameters x tokens + attention, where active parameters are every matrix a token
passes through (the LM head, attention projections, routers, top_k of the routed experts, shared experts,
dense FFNs; not the embedding lookup) and attention = 3 (forward + backward) x 2 x layers x tokens x seq/2
(causal) x heads x (qk_head_dim + v_head_dim).

    python experiments/bench_model_gpu.py                           # seq 2048 and 4096, 16k tokens per step
    python experiments/bench_model_gpu.py --tokens 32768 --seqs 4096 --rows ours
    python experiments/bench_model_gpu.py --profile results/trace   # + a torch profiler trace per row, top kernels
    python experiments/bench_model_gpu.py --device cpu --tiny       # end-to-end smoke run at a tiny size
"""

from __future__ import annotations

import argparse
import gc
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install
import torch  # noqa: E402

from most_lightning.lit.module import build_adamw  # noqa: E402
from most_lightning.model import MoSTConfig, MoSTForCausalLM  # noqa: E402
from most_lightning.model.config import DEEPSEEK_V2_LITE  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
TINY = dict(vocab_size=512, hidden_size=64, num_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
            top_k=2, rope_scaling=None, max_position_embeddings=512)
LR, BETAS, WEIGHT_DECAY = 1e-4, (0.9, 0.95), 0.0
ROWS = ("ours-vanilla", "ours-modality_aware", "transformers-eager", "transformers-grouped_mm", "dense")


def lite_config(layers: int, tiny: bool, **changes) -> MoSTConfig:
    values = {**DEEPSEEK_V2_LITE, "num_layers": layers, "first_k_dense_replace": 1, **(TINY if tiny else {})}
    return MoSTConfig(**{**values, **changes})


def dense_config(config: MoSTConfig) -> MoSTConfig:
    width = config.top_k * config.moe_intermediate_size + config.shared_intermediate_size
    return config.replace(first_k_dense_replace=config.num_layers, intermediate_size=width)


def active_params(config: MoSTConfig) -> int:
    """Parameters of the matrices one token passes through (see the module docstring)."""
    c, h = config, config.hidden_size
    q = h * c.num_heads * c.qk_head_dim if c.q_lora_rank is None else (
        h * c.q_lora_rank + c.q_lora_rank * c.num_heads * c.qk_head_dim)
    attention = (q + h * (c.kv_lora_rank + c.qk_rope_head_dim)
                 + c.kv_lora_rank * c.num_heads * (c.qk_nope_head_dim + c.v_head_dim) + c.num_heads * c.v_head_dim * h)
    dense_ffn = 3 * h * c.intermediate_size
    moe_ffn = 3 * h * (c.top_k * c.moe_intermediate_size + c.shared_intermediate_size) + h * c.n_routed_experts
    layers = sum(attention + (moe_ffn if c.is_moe_layer(i) else dense_ffn) for i in range(c.num_layers))
    return layers + h * c.vocab_size  # + the LM head


def step_flops(config: MoSTConfig, tokens: int, seq_len: int) -> float:
    c = config
    attention = 3 * 2 * c.num_layers * tokens * (seq_len / 2) * c.num_heads * (c.qk_head_dim + c.v_head_dim)
    return 6 * active_params(config) * tokens + attention


def gpu_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)


# ----------------------------------------------------------------------------------------------- rows
def batch(vocab: int, tokens: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rows = max(1, tokens // seq_len)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=g)
    modality = torch.zeros_like(ids)
    modality[:, seq_len // 2:] = 1  # half text, half audio positions
    return dict(ids=ids.to(device), modality=modality.to(device), labels=ids.to(device))  # every position supervised


def build_row(kind: str, config: MoSTConfig, device: torch.device, data: dict) -> tuple[torch.nn.Module, Callable]:
    """(model, one training step) for a row kind."""
    ids, modality, labels = data["ids"], data["modality"], data["labels"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    torch.manual_seed(0)
    if kind.startswith("transformers"):
        from most_lightning.model.hf_compat import to_hf_deepseek_config

        hf = to_hf_deepseek_config(config, n_group=1, topk_group=1)
        hf._experts_implementation = kind.removeprefix("transformers-")
        hf._attn_implementation = "sdpa"
        from transformers import DeepseekV2ForCausalLM

        with torch.device(device):
            model = DeepseekV2ForCausalLM(hf).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                                      fused=device.type in ("cuda", "cpu"))

        def loss_fn():
            return model(input_ids=ids, labels=labels).loss
    else:
        if kind == "dense":
            config = dense_config(config)
        else:
            config = config.replace(router=dict(name=kind.removeprefix("ours-")))
        with torch.device(device):
            model = MoSTForCausalLM(config).train()
        optimizer = build_adamw(model, dict(lr=LR, betas=BETAS, eps=1e-8, weight_decay=WEIGHT_DECAY))

        def loss_fn():
            return model(ids, modality, labels=labels, compute_logits=False).loss

    def step() -> float:
        with autocast:
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


@dataclass
class Result:
    name: str
    config: MoSTConfig
    times: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    loss: float = float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_row(kind: str, config: MoSTConfig, device: torch.device, data: dict, warmup: int, steps: int,
             profile_dir: Path | None) -> Result:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, step = build_row(kind, config, device, data)
    result = Result(kind, dense_config(config) if kind == "dense" else config)
    for _ in range(warmup):  # kernel selection, allocator, optimizer state
        step()
    sync(device)
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        sync(device)
        result.times.append(time.perf_counter() - start)
    result.loss = loss.item()
    if device.type == "cuda":
        result.peak_bytes = torch.cuda.max_memory_allocated(device)
    if profile_dir is not None:
        profile_step(kind, step, device, profile_dir)
    del model, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def profile_step(kind: str, step: Callable, device: torch.device, directory: Path, top: int = 15) -> None:
    """One step under torch.profiler: a Chrome trace per row and the kernels that took the most time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    directory.mkdir(parents=True, exist_ok=True)
    trace = directory / f"trace_{kind}.json"
    prof.export_chrome_trace(str(trace))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of one {kind} step (trace: {trace}), top {top} by {sort}:")
    print(prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60))


def print_results(results: list[Result], tokens: int, seq_len: int, peak: float | None) -> dict[str, dict]:
    base = statistics.median(results[0].times)
    best_theirs = min((statistics.median(r.times) for r in results if r.name.startswith("transformers")),
                      default=None)
    dense = next((statistics.median(r.times) for r in results if r.name == "dense"), None)
    header = ("row", "step ms", "tokens/s", "MFU", "peak GiB", "step / ours-vanilla", "loss")
    lines, table = [], {}
    for r in results:
        med = statistics.median(r.times)
        mfu = step_flops(r.config, tokens, seq_len) / med / peak if peak else None
        table[r.name] = dict(step_s=med, tokens_per_s=tokens / med, mfu=mfu, peak_gib=r.peak_bytes / 2**30)
        lines.append((r.name, f"{med * 1e3:.1f}", f"{tokens / med:,.0f}", f"{mfu:.1%}" if mfu else "-",
                      f"{r.peak_bytes / 2**30:.1f}" if r.peak_bytes else "-", f"{med / base:.2f}x", f"{r.loss:.3f}"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    for line in (header, *lines):
        print("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(line, widths))))
    if best_theirs:
        print(f"ours-vanilla tokens/s / transformers' best: {best_theirs / base:.2f}x")
    if dense:
        print(f"ours-vanilla step time / dense step time: {base / dense:.2f}x (same active FLOPs per token)")
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (smoke run, CPU tests)")
    parser.add_argument("--layers", type=int, default=4, help="layers in all: 1 dense + (layers - 1) MoE")
    parser.add_argument("--seqs", default="2048,4096", help="sequence lengths, comma-separated")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per step (rows = tokens // seq)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by GPU name)")
    parser.add_argument("--profile", type=Path, default=None, help="directory for one profiler trace per row")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: use --device cpu --tiny for a smoke run")
    rows = args.rows.split(",")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows {unknown} unknown; choose from {list(ROWS)}")
    if rows[0] != "ours-vanilla":
        rows = ["ours-vanilla", *(r for r in rows if r != "ours-vanilla")]  # the reference row of the ratios
    config = lite_config(args.layers, args.tiny)
    peak = gpu_peak_flops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    c = config
    command = " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    peak_note = f"bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else "bf16 peak unknown (no MFU; set --peak-tflops)"
    print(f"command: python {command}\ntorch {torch.__version__} on {name}; bf16-mixed (fp32 weights, autocast "
          f"bf16), AdamW; hidden {c.hidden_size}, {c.num_layers} layers (1 dense), {c.n_routed_experts} experts x "
          f"{c.moe_intermediate_size} top-{c.top_k}, shared {c.shared_intermediate_size}, vocab {c.vocab_size}; "
          f"active parameters {active_params(c) / 1e6:.1f}M (dense row {active_params(dense_config(c)) / 1e6:.1f}M); "
          f"{peak_note}")
    print("MFU = (6 x active params x tokens + 3 x 2 x layers x tokens x seq/2 x heads x (qk + v head dims)) "
          "/ (step time x bf16 peak)")
    tables = {}
    for seq_len in (int(s) for s in args.seqs.split(",")):
        data = batch(config.vocab_size, args.tokens, seq_len, device)
        tokens = data["ids"].numel()
        results = [time_row(kind, config, device, data, args.warmup, args.steps, args.profile) for kind in rows]
        print(f"\nsequence {seq_len}, {data['ids'].shape[0]} rows, {tokens} tokens per step; medians of "
              f"{args.steps} steps after {args.warmup} warm-up")
        tables[seq_len] = print_results(results, tokens, seq_len, peak)
    return tables


if __name__ == "__main__":
    main()
