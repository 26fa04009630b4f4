"""Import time and peak memory for a DeepSeek-V2-Lite-shaped checkpoint, extrapolated to 27 layers.

Writes DeepSeek-V2-Lite checkpoints at full width but reduced depth (2 and 3 layers: the dense layer 0 plus 1
or 2 MoE layers), bf16 on disk, sharded with an index as the real one, random weights in the real key layout
(per-expert keys). Each import runs in a fresh process (peak RSS = ru_maxrss of that process): build the empty
model (meta -> materialised, no random init), then stream the checkpoint in. The difference between the 3- and
the 2-layer runs is one MoE layer; 27 layers = the 3-layer run + 24 more MoE layers.

    python experiments/measure_checkpoint_import.py                  # bf16 model; both readers
    python experiments/measure_checkpoint_import.py --fp32           # also an fp32 model (needs ~7.5 GB free)
    python experiments/measure_checkpoint_import.py --dir /tmp/lite  # where the checkpoints go (~5.5 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARD_BYTES = 2 * 2**30


def write_checkpoint(out: Path, num_layers: int) -> None:
    """A V2-Lite-shaped HF directory: config.json (original DeepSeek format) + bf16 shards + index."""
    from safetensors.torch import save_file

    from most_lightning.model import MoSTConfig, MoSTForCausalLM
    from most_lightning.model.checkpoint.export import hf_tensors
    from most_lightning.model.hf_compat import hf_deepseek_config_dict

    if (out / "config.json").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    config = MoSTConfig.from_preset("deepseek_v2_lite", num_layers=num_layers, router=dict(name="vanilla"))
    with torch.device("meta"):
        meta = MoSTForCausalLM(config)
    shapes = [(k, tuple(t.shape)) for k, t in hf_tensors(meta)]
    shards, size = [[]], 0
    for key, shape in shapes:
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    index = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shard}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k, _ in shard})
        del tensors
    total = sum(2 * torch.Size(s).numel() for _, s in shapes)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}))
    (out / "config.json").write_text(json.dumps({**hf_deepseek_config_dict(config), "torch_dtype": "bfloat16"}))


def measure(path: str, dtype: str, reader: str) -> dict:
    """In this (fresh) process: build the empty model, import, report times and peak RSS."""
    from most_lightning.model.checkpoint import CheckpointDir, import_weights, pretrained_config
    from most_lightning.model.checkpoint.api import empty_model

    torch.set_num_threads(1)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    ckpt = CheckpointDir(path)
    model = empty_model(pretrained_config(ckpt), getattr(torch, dtype))
    t1 = time.perf_counter()
    import_weights(model, ckpt, progress=False, reader=reader)
    t2 = time.perf_counter()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(layers=model.config.num_layers, dtype=dtype, reader=reader, build_s=t1 - t0, load_s=t2 - t1,
                peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_start=rss_start,
                model_bytes=model_bytes, params=model.num_parameters(),
                disk_bytes=sum(f.stat().st_size for f in ckpt.files))


def run_child(path: Path, dtype: str, reader: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, __file__, "--child", str(path), dtype, reader], capture_output=True,
                            text=True, env=env, cwd=REPO)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/most_lite_ckpt")
    parser.add_argument("--fp32", action="store_true", help="also import into an fp32 model")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    root = Path(args.dir)
    for layers in (2, 3):
        t = time.perf_counter()
        write_checkpoint(root / f"layers{layers}", layers)
        print(f"checkpoint with {layers} layers ready ({time.perf_counter() - t:.0f} s)", flush=True)
    runs = [("bfloat16", "read"), ("bfloat16", "mmap")] + ([("float32", "read")] if args.fp32 else [])
    repeats = 3
    raw: dict[tuple, list[dict]] = {}
    for _ in range(repeats):  # interleaved repetitions; medians below
        for dtype, reader in runs:
            for layers in (2, 3):
                raw.setdefault((dtype, reader, layers), []).append(run_child(root / f"layers{layers}", dtype, reader))

    def median(rs: list[dict], key: str) -> float:
        return sorted(r[key] for r in rs)[len(rs) // 2]

    print("\n| model dtype | reader | layers | params | disk GiB | build s | load s | load GiB/s | peak RSS GiB | "
          "peak RSS - model GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype, reader in runs:
        m = {layers: {k: median(raw[(dtype, reader, layers)], k) for k in raw[(dtype, reader, layers)][0]
                      if k not in ("dtype", "reader")} for layers in (2, 3)}
        for layers in (2, 3):
            r = m[layers]
            print(f"| {dtype} | {reader} | {layers} (measured) | {r['params'] / 1e9:.3f}B | {gib(r['disk_bytes'])} | "
                  f"{r['build_s']:.1f} | {r['load_s']:.1f} | {r['disk_bytes'] / 2**30 / r['load_s']:.2f} | "
                  f"{gib(r['peak_rss'])} | {gib(r['peak_rss'] - r['model_bytes'])} |")
        # 27 layers: every size is linear in the number of MoE layers (3-layer run + 24 x the per-layer step);
        # load time at the 3-layer throughput; the memory beyond the model at its largest measured value.
        step = {k: m[3][k] - m[2][k] for k in ("params", "disk_bytes", "model_bytes")}
        full = {k: m[3][k] + 24 * step[k] for k in step}
        rate = m[3]["disk_bytes"] / m[3]["load_s"]
        overhead = max(m[l]["peak_rss"] - m[l]["model_bytes"] for l in (2, 3))
        build = m[3]["build_s"] * full["model_bytes"] / m[3]["model_bytes"]
        print(f"| {dtype} | {reader} | 27 (extrapolated) | {full['params'] / 1e9:.3f}B | {gib(full['disk_bytes'])} | "
              f"<= {build:.0f} | {full['disk_bytes'] / rate:.0f} | {rate / 2**30:.2f} | "
              f"{gib(full['model_bytes'] + overhead)} | {gib(overhead)} |")
    print(f"\nmedians of {repeats} interleaved runs, each in a fresh process; machine: {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} (shared with other jobs)")


if __name__ == "__main__":
    main()
