"""Training throughput of the three batchings (data.batching = fixed | bucket | pack) on the demo corpus.

Each batching gets its own stream of the stage-1 mixture (ASR 0.4 / TTS 0.4 / text 0.2) and its own copy of one
MoST model (same initial weights); training steps (forward + backward + AdamW) of the three run interleaved,
repetition by repetition, in one process. Reported per batching: padding (share of the batch's cells that hold
no token), examples and supervised tokens per second of training, and the ratio to fixed batching.

    python experiments/bench_batching.py                # demo corpus of `python run.py`, tiny model, 2 threads
    python experiments/bench_batching.py --device cuda  # the steps on a GPU under bf16 autocast (data on the CPU)
    python experiments/bench_batching.py --quick        # smoke run

In packed rows each example attends only within itself: the attention regroups the rows' examples into batches by
length class (most_lightning/model/packing.py), which costs a few host syncs per forward; the table shows whether
the saved padding pays for that.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install
import torch  # noqa: E402

from bench_loader import DEMO, STAGE1, make_step, time_steps  # noqa: E402
from bench_moe import keep_freed_memory  # noqa: E402
from most_lightning.data.datamodule import MoSTDataModule  # noqa: E402
from most_lightning.data.demo_corpus import DemoCorpusRecipe  # noqa: E402
from most_lightning.model import MoSTConfig, MoSTForCausalLM  # noqa: E402


def batch_stream(data_dir: str, batching: str, batch_size: int, max_tokens: int, max_length: int):
    dm = MoSTDataModule.from_settings(data_dir=data_dir, corpus=DemoCorpusRecipe(**DEMO), batch_size=batch_size,
                                      max_length=max_length, sources=STAGE1, shard_sampling="resampled",
                                      batches_per_epoch=10**9, shuffle_buffer=200, verify_audio="header", seed=0,
                                      batching=batching, max_tokens=max_tokens, progress=True)
    dm.prepare_data()
    dm.setup("fit")
    return dm.tokenizer.vocab_size, iter(dm.source_stream(rank=0, world_size=1))


def supervised(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / "data"))
    p.add_argument("--batch-size", type=int, default=16, help="examples per fixed batch")
    p.add_argument("--max-tokens", type=int, default=4096, help="token budget of bucket and pack batches")
    p.add_argument("--max-length", type=int, default=1024, help="longest example; the row length of pack")
    p.add_argument("--batches", type=int, default=6, help="batches per repetition and batching")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the training steps run; on cuda under bf16 autocast")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions of 2 batches")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.reps = 2, 2
    torch.set_num_threads(args.threads)
    note = "malloc keeps freed memory" if keep_freed_memory() else "default malloc"
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])

    streams = {}
    for batching in ("fixed", "bucket", "pack"):
        vocab, streams[batching] = batch_stream(args.data_dir, batching, args.batch_size, args.max_tokens,
                                                args.max_length)
    torch.manual_seed(0)
    model = MoSTForCausalLM(MoSTConfig.from_preset("tiny", vocab_size=vocab)).train()
    autocast = torch.bfloat16 if args.device.startswith("cuda") else None
    steps = {batching: make_step(copy.deepcopy(model).to(args.device), args.device, autocast) for batching in streams}

    totals = {b: {"seconds": [], "examples": 0, "supervised": 0, "tokens": 0, "cells": 0} for b in streams}
    for rep in range(args.reps + 1):  # repetition 0 warms up
        for batching, stream in streams.items():
            batches = [next(stream) for _ in range(args.batches)]
            seconds = time_steps(steps[batching], batches, args.device)
            if rep == 0:
                continue
            t = totals[batching]
            t["seconds"].append(seconds)
            t["examples"] += sum(len(b["key"]) for b in batches)
            t["supervised"] += sum(supervised(b) for b in batches)
            t["tokens"] += sum(int(b["attention_mask"].sum()) for b in batches)
            t["cells"] += sum(b["input_ids"].numel() for b in batches)

    where = f"steps on {args.device}" + (" (bf16 autocast)" if autocast else "")
    print(f"\n{command}\n{args.reps} interleaved repetitions x {args.batches} batches per batching, tiny MoST, "
          f"{args.threads} threads, {where}, {note}; rates from the summed time of all repetitions")
    print(f"| {'batching':<44} | {'padding':>7} | {'examples/s':>10} | {'supervised tok/s':>16} | {'vs fixed':>8} |")
    print(f"|{'-' * 46}|{'-' * 9}|{'-' * 12}|{'-' * 18}|{'-' * 10}|")
    labels = {"fixed": f"fixed, {args.batch_size} examples",
              "bucket": f"bucket, <= {args.max_tokens} cells",
              "pack": f"pack, rows of {args.max_length}, {args.max_tokens // args.max_length} rows"}
    rates = {}
    for batching, t in totals.items():
        seconds = sum(t["seconds"])
        rates[batching] = t["supervised"] / seconds
        print(f"| {labels[batching]:<44} | {1 - t['tokens'] / t['cells']:>7.1%} | {t['examples'] / seconds:>10.1f} | "
              f"{rates[batching]:>16.0f} | {rates[batching] / rates['fixed']:>7.2f}x |")
    print(f"(median step seconds: " + ", ".join(f"{b} {statistics.median(t['seconds']) / args.batches:.3f}"
                                                for b, t in totals.items()) + ")")
    return rates


if __name__ == "__main__":
    main()
