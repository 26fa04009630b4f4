"""DeepSpeed ZeRO-2 + CPU optimizer offload on one CUDA GPU: tokens/s, peak GPU memory, peak host memory.

    python experiments/gpu_deepspeed_check.py [--layers 4] [--batch 2] [--seq 2048] [--steps 8] [--no-offload]

Runs Lightning's stock DeepSpeedStrategy (stage 2, offload_optimizer to the CPU, DeepSpeedCPUAdam, bf16-mixed,
gradient clipping 1.0) on a MoST of DeepSeek-V2-Lite width (hidden 2048, MLA, 64 routed experts x 1408, top-6,
2 shared experts, vocab 102,400) with only a few layers, on synthetic mixed text/speech batches. The first
`--warmup` steps are not timed (DeepSpeed's op builds and the first allocations). Prints one table; the numbers
feed docs/scaling.md. Needs a CUDA GPU; never part of the test suite.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

V2_LITE_WIDTH = dict(preset="deepseek_v2_lite", hidden_size=2048, num_heads=16, attention="mla",
                     intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
                     top_k=6, first_k_dense_replace=1, audio_expert_fraction=0.5)
ROUTER = dict(name="modality_aware", mask="probs", renormalize=False, balance_loss_alpha=0.001, z_loss_coef=0.0,
              routed_scaling_factor=1.0)
VOCAB = 102400


class SyntheticBatches(torch.utils.data.IterableDataset):
    """Rows whose second half is speech (modality 1), every position supervised."""

    def __init__(self, batch: int, seq: int, n: int):
        self.batch, self.seq, self.n = batch, seq, n

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(self.n):
            ids = torch.randint(0, VOCAB, (self.batch, self.seq), generator=g)
            modality = torch.zeros_like(ids)
            modality[:, self.seq // 2:] = 1
            yield dict(input_ids=ids, labels=ids.clone(), modality=modality,
                       attention_mask=torch.ones_like(ids, dtype=torch.bool), task=["asr"] * self.batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="rows per micro-batch")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-offload", action="store_true", help="ZeRO-2 without optimizer offload, for contrast")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (this check measures the GPU path; CPU DeepSpeed runs in tests/)")

    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from most_lightning.lit import MoSTLitModule

    class Timer(Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_end(self, trainer, *_):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    config = {"zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": True,
                                    "reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000},
              "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0,
              "train_micro_batch_size_per_gpu": args.batch}
    if not args.no_offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    module = MoSTLitModule(model={**V2_LITE_WIDTH, "num_layers": args.layers}, router=ROUTER, vocab_size=VOCAB,
                           optimizer=dict(lr=5e-5, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0),
                           scheduler=dict(warmup_steps=0, min_lr_ratio=1.0, total_steps=1000))
    n_params = sum(p.numel() for p in module.parameters())
    timer = Timer()
    steps = args.warmup + args.steps
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=DeepSpeedStrategy(config=config), precision="bf16-mixed",
                        gradient_clip_val=1.0, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[timer])
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, torch.utils.data.DataLoader(SyntheticBatches(args.batch, args.seq, steps), batch_size=None))
    timed = timer.times[args.warmup - 1:] if args.warmup else [timer.times[0]] + timer.times
    seconds = (timed[-1] - timed[0]) / (len(timed) - 1)
    tokens = args.batch * args.seq
    host_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    print(f"\n{torch.cuda.get_device_name()}: MoST at V2-Lite width, {args.layers} layers, {n_params / 1e9:.2f}B "
          f"parameters, ZeRO-2{'' if args.no_offload else ' + CPU optimizer offload'}, bf16-mixed")
    print("| micro-batch x seq | s/step | tokens/s | peak GPU GiB | peak host RSS GiB |")
    print("|---|---|---|---|---|")
    print(f"| {args.batch} x {args.seq} | {seconds:.3f} | {tokens / seconds:,.0f} | "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} | {host_gib:.1f} |")


if __name__ == "__main__":
    main()
