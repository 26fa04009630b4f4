"""Save a MoST model as a HF-style directory: config.json + safetensors (sharded with an index when large).

The config.json is DeepSeek-V2's own (model_type deepseek_v2) for MLA models, so transformers'
DeepseekV2ForCausalLM loads it (vanilla routing semantics: a modality-aware router is not part of that
format), plus a "most" entry with the full MoSTConfig so that our importer rebuilds the model exactly
(router, partition, GQA models too). Experts are written per expert (``mlp.experts.{j}.*_proj.weight``), the
layout of the original DeepSeek checkpoints and of transformers' save_pretrained; ``expert_layout="fused"``
writes transformers' in-memory layout instead. Shards are built and written one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from most_lightning.model.checkpoint.files import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from most_lightning.model.checkpoint.loader import model_tensors
from most_lightning.model.hf_compat import hf_deepseek_config_dict

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
EXPORT_LAYOUTS = ("per_expert", "fused")


def hf_tensors(model: torch.nn.Module, expert_layout: str = "per_expert") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor view) in the model's order; tied lm_head left out (HF convention)."""
    if expert_layout not in EXPORT_LAYOUTS:
        raise ValueError(f"expert_layout={expert_layout!r}: allowed values are {list(EXPORT_LAYOUTS)}")
    tensors = model_tensors(model)
    done: set[str] = set()
    for name, tensor in tensors.items():
        if ".mlp.experts." not in name:
            yield name, tensor.detach()
            continue
        prefix = name.rsplit(".", 1)[0]
        if prefix in done:
            continue
        done.add(prefix)
        gate, up, down = (tensors[f"{prefix}.{p}"].detach() for p in ("gate_proj", "up_proj", "down_proj"))
        if expert_layout == "fused":
            yield f"{prefix}.gate_up_proj", torch.cat((gate, up), dim=1)
            yield f"{prefix}.down_proj", down
        else:
            for j in range(gate.shape[0]):
                for p, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
                    yield f"{prefix}.{j}.{p}.weight", w[j]
        yield from empty_shared_experts(model.config, prefix.removesuffix(".experts"), gate.dtype)


def empty_shared_experts(config, mlp_prefix: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Without shared experts (n_shared_experts=0), transformers' DeepseekV2 still builds a shared-expert MLP of
    width 0 in every MoE layer; its zero-size weights are written too, so that the load reports no missing keys
    (and no "newly initialized" warning for weights that hold nothing)."""
    if config.attention != "mla" or config.n_shared_experts:
        return
    hidden = config.hidden_size
    for name, shape in (("gate_proj", (0, hidden)), ("up_proj", (0, hidden)), ("down_proj", (hidden, 0))):
        yield f"{mlp_prefix}.shared_experts.{name}.weight", torch.empty(shape, dtype=dtype)


def export_config(config, dtype: torch.dtype) -> dict:
    most = dataclasses.asdict(config)
    if config.attention == "mla":
        out = hf_deepseek_config_dict(config)
    else:  # no transformers class computes an upcycled GQA MoE; our importer reads the "most" entry
        out = {"model_type": "most_lightning", "architectures": ["MoSTForCausalLM"], "vocab_size": config.vocab_size}
    out["torch_dtype"] = str(dtype).removeprefix("torch.")
    out["most"] = most
    return out


@torch.no_grad()
def export_hf(model: torch.nn.Module, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, expert_layout: str = "per_expert") -> list[Path]:
    """Write ``model`` to ``out_dir``; returns the safetensors files written."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in out.glob("*.safetensors")) + ([INDEX_FILE] if (out / INDEX_FILE).exists() else [])
    if stale:
        raise FileExistsError(f"{out} already holds {stale[:3]}; export into an empty directory")
    dtype = dtype or next(model.parameters()).dtype
    shards: list[list[str]] = [[]]
    size = 0
    sizes: dict[str, int] = {}
    for key, tensor in hf_tensors(model, expert_layout):  # plan the shards from sizes only
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        sizes[key] = nbytes
        size += nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shard_of = {key: i for i, keys in enumerate(shards) for key in keys}
    current, index, files = 0, {}, []
    buffer: dict[str, torch.Tensor] = {}

    def flush(i: int) -> None:
        save_file(buffer, os.fspath(out / names[i]), metadata={"format": "pt"})
        files.append(out / names[i])
        buffer.clear()

    for key, tensor in hf_tensors(model, expert_layout):  # then build and write one shard at a time
        if shard_of[key] != current:
            flush(current)
            current = shard_of[key]
        buffer[key] = tensor.to(dtype=dtype, copy=True).contiguous()
        index[key] = names[current]
    flush(current)
    if n > 1:
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": sum(sizes.values())},
                                                  "weight_map": index}, indent=2))
    (out / CONFIG_FILE).write_text(json.dumps(export_config(model.config, dtype), indent=2))
    return files
