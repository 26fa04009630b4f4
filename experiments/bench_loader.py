"""Loader throughput (read shards, decode/verify audio, read units, format tasks, tokenise, batch) against the
training step's consumption, on the same machine, and which one is the bottleneck.

The loader is the stage-1 recipe's stream (ASR 0.4 / TTS 0.4 / text 0.2 over the demo corpus shards) in this
process (one DataLoader worker's worth of work); the training step is forward + backward + AdamW of MoST on the
very batches the loader made. Loader and step repetitions are interleaved in one process; rates are medians.

    python experiments/bench_loader.py                    # demo corpus of `python run.py`, tiny + small model
    python experiments/bench_loader.py --quick            # smoke run
    python experiments/bench_loader.py --device cuda      # the step on a GPU (the loader stays on the CPU)
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from most_lightning.data.datamodule import MoSTDataModule  # noqa: E402
from most_lightning.data.demo_corpus import DemoCorpusRecipe  # noqa: E402
from most_lightning.model import MoSTConfig, MoSTForCausalLM  # noqa: E402

STAGE1 = {"asr_tts": {"shards": "speech/train-*.tar", "tasks": {"asr": 0.4, "tts": 0.4}},
          "text": {"shards": "text/text-*.tar", "tasks": {"text": 0.2}}}
# conf/data/demo.yaml's corpus (what `python run.py` builds)
DEMO = dict(n_train=600, n_val=40, n_test=40, n_text=1500, voices_per_sentence=1, n_units=500, text_vocab_size=2000)
MODELS = {  # name -> preset overrides; "small" is ~4x tiny's width x depth work per token
    "tiny": {},
    "small": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536, moe_intermediate_size=256,
                  n_routed_experts=16, top_k=4),
}


def make_loader_stream(data_dir: str, verify_audio: str, batch_size: int, seed: int):
    dm = MoSTDataModule.from_settings(data_dir=data_dir, corpus=DemoCorpusRecipe(**DEMO), batch_size=batch_size,
                                      max_length=1024, sources=STAGE1, shard_sampling="resampled",
                                      batches_per_epoch=10**9, shuffle_buffer=200, verify_audio=verify_audio,
                                      seed=seed, progress=True)
    dm.prepare_data()
    dm.setup("fit")
    return dm, iter(dm.source_stream(rank=0, world_size=1))


def time_loader(stream, n: int) -> tuple[float, int, int, list[dict]]:
    start = time.perf_counter()
    batches = [next(stream) for _ in range(n)]
    seconds = time.perf_counter() - start
    return seconds, sum(len(b["key"]) for b in batches), sum(int(b["attention_mask"].sum()) for b in batches), batches


def make_step(model: torch.nn.Module, device: str, autocast_dtype: torch.dtype | None = None):
    """One training step (forward, backward, clipping, AdamW); under autocast to ``autocast_dtype`` if given."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    device_type = torch.device(device).type

    def step(batch: dict) -> None:
        ids, modality = batch["input_ids"].to(device), batch["modality"].to(device)
        labels, mask = batch["labels"].to(device), batch["attention_mask"].to(device)
        segments = batch.get("segment_ids")  # packed rows (data.batching=pack)
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(ids, modality, attention_mask=mask,
                        segment_ids=None if segments is None else segments.to(device))
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        (loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(step, batches: list[dict], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches:
        step(b)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(ROOT / "data"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=8, help="batches per repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="tiny,small")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions of 2 batches")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.reps = 2, 2
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])

    dm, header_stream = make_loader_stream(args.data_dir, "header", args.batch_size, 0)
    _, full_stream = make_loader_stream(args.data_dir, "full", args.batch_size, 1)
    vocab = dm.tokenizer.vocab_size
    models = {}
    for name in args.models.split(","):
        torch.manual_seed(0)
        config = MoSTConfig.from_preset("tiny", vocab_size=vocab, **MODELS[name])
        model = MoSTForCausalLM(config).to(args.device).train()
        models[name] = (make_step(model, args.device), sum(q.numel() for q in model.parameters()))

    rates: dict[str, list[tuple[float, float]]] = {}
    for rep in range(args.reps + 1):  # repetition 0 warms up (first shard opens, allocator, kernels)
        row_rates = {}
        for label, stream in (("loader, audio header check", header_stream), ("loader, full FLAC decode", full_stream)):
            seconds, n_samples, n_tokens, batches = time_loader(stream, args.batches)
            row_rates[label] = (n_samples / seconds, n_tokens / seconds)
        for name, (step, _) in models.items():
            seconds = time_steps(step, batches, args.device)
            n_samples = sum(len(b["key"]) for b in batches)
            n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            row_rates[f"train step, {name}"] = (n_samples / seconds, n_tokens / seconds)
        if rep:
            for k, v in row_rates.items():
                rates.setdefault(k, []).append(v)

    medians = {k: (statistics.median(s for s, _ in v), statistics.median(t for _, t in v)) for k, v in rates.items()}
    print(f"\n{command}\n{args.reps} interleaved repetitions x {args.batches} batches of {args.batch_size}, "
          f"{args.threads} threads, step on {args.device}; medians")
    print(f"| {'what':<34} | {'samples/s':>10} | {'tokens/s':>10} |")
    print(f"|{'-' * 36}|{'-' * 12}|{'-' * 12}|")
    for k, (s, t) in medians.items():
        print(f"| {k:<34} | {s:>10.1f} | {t:>10.0f} |")
    loader_tps = medians["loader, audio header check"][1]
    print()
    for name, (_, n_params) in models.items():
        step_tps = medians[f"train step, {name}"][1]
        ratio = loader_tps / step_tps
        if ratio >= 1:
            verdict = (f"the training step is the bottleneck: one loader worker makes {ratio:.1f}x the tokens the "
                       f"{name} step ({n_params / 1e6:.1f}M params) consumes")
        else:
            verdict = (f"the LOADER is the bottleneck: it makes {ratio:.2f}x what the {name} step consumes; use "
                       f"data.num_workers >= {math.ceil(1 / ratio)}")
        print(f"- {verdict}")
    return {k: t for k, (_, t) in medians.items()}


if __name__ == "__main__":
    main()
