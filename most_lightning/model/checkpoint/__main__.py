"""Command line: export a trained MoST, check a HF checkpoint directory without loading its weights.

    python -m most_lightning.model.checkpoint export logs/train/runs/<time> out/ [--dtype bfloat16]
    python -m most_lightning.model.checkpoint export path/to/last.ckpt out/ --tokenizer data/.../tokenizer
    python -m most_lightning.model.checkpoint export path/to/deepspeed_ckpt_dir out/   # ZeRO shards, consolidated
    python -m most_lightning.model.checkpoint inspect DeepSeek-V2-Lite/ [--partition copy]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import torch

from most_lightning.model.checkpoint.files import CheckpointError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_lightning_checkpoint(source: Path) -> Path:
    """A .ckpt file or a sharded DeepSpeed checkpoint directory (which is what a .ckpt is under DeepSpeed)."""
    from most_lightning.model.checkpoint.deepspeed_dir import is_deepspeed_checkpoint

    if source.is_file() or is_deepspeed_checkpoint(source):
        return source
    folder = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    last = folder / "last.ckpt"
    if last.is_file() or is_deepspeed_checkpoint(last):
        return last
    found = sorted((p for p in folder.glob("*.ckpt") if p.is_file() or is_deepspeed_checkpoint(p)),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise CheckpointError(f"{source}: no Lightning checkpoint (*.ckpt, or a run dir with checkpoints/)")
    return found[-1]


def model_from_lightning(path: Path):
    """The MoSTForCausalLM of a MoSTLitModule checkpoint (a .ckpt file, or a sharded DeepSpeed checkpoint
    directory consolidated to fp32), read by the one checkpoint reader (most_lightning.lit.checkpoint:
    weights_only, missing keys named). This command line is an entry point, so it may use the Lightning layer."""
    from most_lightning.lit.checkpoint import load_lit_module

    return load_lit_module(path).model


def cmd_export(args) -> None:
    from most_lightning.model.checkpoint.export import export_hf

    source = find_lightning_checkpoint(Path(args.source))
    model = model_from_lightning(source)
    files = export_hf(model, args.out, dtype=DTYPES[args.dtype] if args.dtype else None,
                      max_shard_bytes=int(args.max_shard_gb * 2**30), expert_layout=args.expert_layout)
    if args.tokenizer:
        for name in ("tokenizer.json", "most_tokenizer.json"):
            if (Path(args.tokenizer) / name).is_file():
                shutil.copy(Path(args.tokenizer) / name, Path(args.out) / name)
    print(f"{source} -> {args.out}: {len(files)} safetensors file(s), {model.num_parameters():,} parameters, "
          f"router {model.config.router.name}")


def cmd_inspect(args) -> None:
    """Resolve the config and check the full load plan against the headers, on the meta device."""
    from most_lightning.model.checkpoint.api import architecture_fields, checkpoint_kind, pretrained_config
    from most_lightning.model.checkpoint.deepseek import deepseek_plan
    from most_lightning.model.checkpoint.files import CheckpointDir
    from most_lightning.model.checkpoint.loader import check_plan, model_tensors
    from most_lightning.model.decoder import MoSTForCausalLM

    ckpt = CheckpointDir(args.path)
    kind = checkpoint_kind(ckpt)
    size = sum(f.stat().st_size for f in ckpt.files)
    print(f"{ckpt}: {kind}, {size / 2**30:.2f} GiB")
    if kind == "llama":
        print("dense Llama: upcycle it with model.init.upcycle_from (the MoE design comes from the model group)")
        print(architecture_fields(ckpt, upcycle=True)[0])
        return
    config = pretrained_config(ckpt, layout=args.partition,
                               router=dict(name="modality_aware") if args.partition != "index" else None)
    with torch.device("meta"):
        model = MoSTForCausalLM(config)
    n_ckpt = ckpt.config.get("most", ckpt.config)["n_routed_experts"]
    stats = {i: torch.zeros(2, n_ckpt) for i in range(config.num_layers)} if args.partition == "by_routing_stats" else None
    check_plan(deepseek_plan(model, ckpt, n_ckpt, args.partition, stats), ckpt, model_tensors(model))
    print(f"load plan OK: {model.num_parameters():,} parameters, {config.num_layers} layers, "
          f"{config.n_routed_experts} routed experts")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m most_lightning.model.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="Lightning checkpoint (or run dir) -> HF-style dir")
    exp.add_argument("source", help="a .ckpt file, a sharded DeepSpeed checkpoint dir, a run dir "
                     "(uses checkpoints/last.ckpt) or a checkpoints dir")
    exp.add_argument("out", help="output directory (must not hold safetensors files yet)")
    exp.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the model's dtype")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size limit in GiB (default 5)")
    exp.add_argument("--expert-layout", choices=["per_expert", "fused"], default="per_expert")
    exp.add_argument("--tokenizer", default=None, help="a MoSTTokenizer dir to copy alongside")
    exp.set_defaults(run=cmd_export)
    ins = sub.add_parser("inspect", help="check a HF checkpoint dir against its config (headers only)")
    ins.add_argument("path")
    ins.add_argument("--partition", default="index", help="expert layout on import (index, copy, by_routing_stats)")
    ins.set_defaults(run=cmd_inspect)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.run(args)
    except (CheckpointError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
