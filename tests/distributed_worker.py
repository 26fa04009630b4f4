"""One rank of a small distributed training run, started by tests/distributed.py the way torchrun starts ranks.

    python tests/distributed_worker.py '<json spec>'

Trains a tiny MoSTLitModule for `steps` optimiser steps on fixed synthetic batches with the strategy named
in the spec (a file of conf/strategy, or a DeepSpeed ZeRO stage), then writes into `out`:
  result.json   global step, world size, strategy class, the optimizer's class and param-group sizes
  weights.pt    rank 0: every trainable parameter after training (ZeRO checkpoints consolidated to fp32)
  ckpt/         when `save` is set: the Lightning (DeepSpeed: sharded) checkpoint

Batches: rank r at step s gets batch (s, r); a single process gets (s, 0), (s, 1), ... with gradient
accumulation over them, which is what data parallelism computes. `modalities: split` gives rank 0 text-only
batches and rank 1 speech-only ones (MoST-C frames included with `continuous: true`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY_MODEL = dict(preset="tiny", hidden_size=32, num_heads=2, intermediate_size=64, moe_intermediate_size=16,
                  kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_layers=2)
VOCAB = 96
SEQ = 12
ROWS = 2


def _strategy_node(spec: dict) -> dict:
    from omegaconf import OmegaConf

    name = spec["strategy"]
    if name.startswith("zero"):  # zero1 / zero2 / zero3: a plain DeepSpeed stage
        stage = int(name[-1])
        return {"name": name, "kind": "deepspeed",
                "deepspeed": {"zero_optimization": {"stage": stage}, **spec.get("deepspeed_extra", {})}}
    if name == "single":
        return {"name": "auto", "kind": "auto"}
    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "strategy" / f"{name}.yaml"))["strategy"]


def make_batch(step: int, rank: int, kind: str, module) -> dict:
    """kind: mixed (text + unit speech rows), text, speech (MoST-C frames when the module has audio input)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(4, VOCAB, (ROWS, SEQ), generator=g)
    modality = torch.zeros(ROWS, SEQ, dtype=torch.long)
    if kind == "mixed":
        modality[0, SEQ // 2:] = 1
    elif kind == "speech":
        modality[:, 2:SEQ - 3] = 1
    labels = ids.clone()
    labels[:, :3] = -100
    batch = dict(input_ids=ids, labels=labels, modality=modality,
                 attention_mask=torch.ones(ROWS, SEQ, dtype=torch.bool),
                 task=["asr"] * ROWS if kind == "speech" else ["text"] * ROWS)
    if kind == "speech" and module.audio_input is not None:
        waves = torch.randn(ROWS, 3200, generator=g) * 0.1
        lengths = torch.tensor([3200, 2400])
        frames = [f.shape[0] for f in module.audio_input.features(waves, lengths)]
        mask = torch.zeros(ROWS, SEQ, dtype=torch.bool)
        for i, n in enumerate(frames):
            mask[i, 2:2 + n] = True
        labels[mask] = -100
        batch |= dict(audio_mask=mask, audio_waves=waves, audio_wave_lengths=lengths, modality=modality | mask.long())
    return batch


def kind_of(spec: dict, rank: int) -> str:
    if spec.get("modalities") == "split":
        return ("text", "speech")[rank % 2]
    return "mixed"


class Batches(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def build_module(spec: dict):
    from omegaconf import OmegaConf

    from most_lightning.lit import MoSTLitModule

    torch.manual_seed(0)
    router = {"name": "modality_aware"}  # a registered router with its class's defaults (conf/router/modality_aware.yaml)
    audio = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "audio" / "continuous.yaml")) \
        if spec.get("continuous") else None
    module = MoSTLitModule(model=TINY_MODEL, router=router, vocab_size=VOCAB, audio=audio,
                           optimizer=dict(lr=float(spec.get("lr", 1e-2)), betas=[0.9, 0.95], eps=1e-8,
                                          weight_decay=float(spec.get("weight_decay", 0.0))),
                           scheduler=dict(warmup_steps=0, min_lr_ratio=1.0, total_steps=100))
    module.model.fused_loss = False  # one loss path for every strategy (ZeRO-3 cannot take the fused one)
    return module


def main() -> None:
    spec = json.loads(sys.argv[1])
    import lightning as L

    from most_lightning.lit.strategies import build_strategy

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    steps = int(spec.get("steps", 3))
    module = build_module(spec)
    if world > 1:
        items = [make_batch(s, rank, kind_of(spec, rank), module) for s in range(steps)]
        accumulate = 1
    else:
        ranks = int(spec.get("emulate_ranks", 1))
        items = [make_batch(s, r, kind_of(spec, r), module) for s in range(steps) for r in range(ranks)]
        accumulate = ranks
    trainer_cfg = dict(accelerator="cpu", devices=world, num_nodes=1, precision=spec.get("precision", "32-true"),
                       gradient_clip_val=float(spec.get("clip", 1.0)), gradient_clip_algorithm="norm",
                       accumulate_grad_batches=accumulate, strategy="auto")
    strategy, _ = build_strategy(_strategy_node(spec), trainer_cfg, {"batch_size": ROWS}, ckpt_path=spec.get("resume"),
                                 audio={"mode": "continuous"} if spec.get("continuous") else None)
    trainer = L.Trainer(strategy=strategy, **{k: v for k, v in trainer_cfg.items() if k != "strategy"},
                        max_steps=steps + int(spec.get("extra_steps", 0)), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=str(out))
    if spec.get("extra_steps"):  # resumed run: batches of the steps after the checkpoint
        more = int(spec["extra_steps"])
        items = items + ([make_batch(s, rank, kind_of(spec, rank), module) for s in range(steps, steps + more)]
                         if world > 1 else
                         [make_batch(s, r, kind_of(spec, r), module) for s in range(steps, steps + more)
                          for r in range(int(spec.get("emulate_ranks", 1)))])
    loader = torch.utils.data.DataLoader(Batches(items), batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=spec.get("resume"))
    if spec.get("save"):
        trainer.save_checkpoint(str(out / "ckpt"))
    weights = trained_weights(trainer, module, out)
    if trainer.is_global_zero:
        optimizer = trainer.optimizers[0]
        inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the client optimizer
        groups = [{"name": g.get("name"), "weight_decay": g.get("weight_decay")} for g in inner.param_groups]
        torch.save(weights, out / "weights.pt")
        (out / "result.json").write_text(json.dumps({
            "global_step": trainer.global_step, "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__, "optimizer": type(inner).__name__, "groups": groups,
        }))


def trained_weights(trainer, module, out: Path) -> dict[str, torch.Tensor] | None:
    """{name: fp32 tensor} of the trainable parameters, on rank 0 (ZeRO: gathered from the partitions)."""
    engine = getattr(trainer.strategy, "deepspeed_engine", None) if hasattr(trainer.strategy, "config") else None
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    if engine is None:
        return {n: p.detach().float().clone() for n, p in module.named_parameters() if n in names}
    # fp32 master weights, gathered from the ZeRO partitions (the same numbers zero_to_fp32 would write)
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters())
    return {n: safe_get_full_fp32_param(params[n]).detach().float().clone() for n in names}


if __name__ == "__main__":
    from most_lightning.lit.launch import close_process_group, exit_launched_rank

    main()
    close_process_group()
    exit_launched_rank()
