"""Build a MoST model from a HF checkpoint directory: import (DeepSeek-V2, or our own export) or upcycle (Llama).

    model, report = load_pretrained("DeepSeek-V2-Lite/", router=dict(name="modality_aware"))
    model, report = upcycle_pretrained("Llama-3.2-3B/", n_routed_experts=8, top_k=2, moe_intermediate_size=8192,
                                       n_shared_experts=0, first_k_dense_replace=0, router=dict(name="vanilla",
                                       renormalize=True))

The model is built on the meta device and materialised empty in the target dtype, then filled tensor by tensor
from the checkpoint: no random init of billions of weights, no second copy in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

from most_lightning.model.checkpoint.deepseek import deepseek_plan
from most_lightning.model.checkpoint.expert_layout import load_routing_stats, model_experts_for
from most_lightning.model.checkpoint.files import CheckpointDir, CheckpointError
from most_lightning.model.checkpoint.loader import LoadReport, run_plan
from most_lightning.model.checkpoint.upcycle import llama_upcycle_plan
from most_lightning.model.config import MoSTConfig, RouterConfig, without_retired_fields
from most_lightning.model.decoder import MoSTForCausalLM
from most_lightning.model.hf_compat import most_fields_from_hf_deepseek, most_fields_from_hf_llama
from most_lightning.model.router import init_router_buffers, routers
from most_lightning.model.rope import RotaryEmbedding

log = logging.getLogger(__name__)

MOST_KEY = "most"  # config.json entry our exporter writes: the full MoSTConfig, for a bit-exact reload
# MoE design choices an upcycled model takes from the model group (everything else comes from config.json).
UPCYCLE_CHOICES = ("n_routed_experts", "top_k", "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace")
# MoST choices that are never architecture of the checkpoint.
MOST_CHOICES = ("audio_expert_fraction", "partition", "expert_dispatch")


def checkpoint_kind(ckpt: CheckpointDir) -> str:
    """'most' (our export), 'deepseek_v2' or 'llama', else an error naming config.json's model_type."""
    if MOST_KEY in ckpt.config:
        return "most"
    model_type = ckpt.config.get("model_type")
    archs = ckpt.config.get("architectures") or []
    if model_type == "deepseek_v2" or "DeepseekV2ForCausalLM" in archs:
        return "deepseek_v2"
    if model_type == "llama" or "LlamaForCausalLM" in archs:
        return "llama"
    raise CheckpointError(f"{ckpt.path / 'config.json'}: model_type={model_type!r} (architectures {archs}) is neither "
                          "DeepSeek-V2 (import) nor Llama (upcycle)")


def architecture_fields(ckpt: CheckpointDir, upcycle: bool, layout: str = "index") -> tuple[dict, dict]:
    """(MoSTConfig fields, router fields) that the checkpoint fixes; router fields are the checkpoint's own
    routing (used when the caller gives no router)."""
    kind = checkpoint_kind(ckpt)
    source = str(ckpt.path / "config.json")
    try:
        if upcycle:
            if kind != "llama":
                raise ValueError(f"{source}: upcycling needs a dense Llama checkpoint, this one is {kind!r} "
                                 "(import it with model.init.from_pretrained=<dir> instead)")
            return most_fields_from_hf_llama(ckpt.config, source), {}
        if kind == "llama":
            raise ValueError(f"{source}: a dense Llama checkpoint is not a MoE to import; upcycle it with "
                             "model.init.upcycle_from=<dir>")
        if kind == "most":
            fields = without_retired_fields(ckpt.config[MOST_KEY], source)
            router = fields.pop("router")
            return fields, router
        fields, router = most_fields_from_hf_deepseek(ckpt.config, source)
    except (KeyError, ValueError) as err:
        if isinstance(err, KeyError):
            raise CheckpointError(f"{source}: required field {err.args[0]!r} is missing") from None
        raise CheckpointError(str(err)) from None
    method = ckpt.config.get("topk_method", "greedy")
    if method != "greedy":
        log.warning(f"{source}: topk_method={method!r}; MoST's routers choose experts greedily (the checkpoint's "
                    "group-limited routing is not reproduced)")
    fields["n_routed_experts"] = model_experts_for(layout, fields["n_routed_experts"])
    return fields, router


def empty_model(config: MoSTConfig, dtype: torch.dtype | None = None) -> MoSTForCausalLM:
    """A MoST model with uninitialised parameters in ``dtype`` (every one must then be loaded) and correct
    non-persistent buffers (rope frequencies in fp32; each router's own, rebuilt by its init_buffers hook)."""
    previous = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device("meta"):
            model = MoSTForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device="cpu")
    c = config
    if c.tie_word_embeddings:  # to_empty gives each module its own new tensor: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    rope_dim = c.qk_rope_head_dim if c.attention == "mla" else (c.head_dim or c.hidden_size // c.num_heads)
    model.model.rotary = RotaryEmbedding(rope_dim, c.rope_theta, c.rope_scaling)
    for _, router in routers(model):
        init_router_buffers(router)
    return model


def import_weights(model: MoSTForCausalLM, path: str | os.PathLike | CheckpointDir, layout: str = "index",
                   routing_stats: str | os.PathLike | dict | None = None, new_token_rows: str = "mean",
                   progress: bool = True, reader: str = "read") -> LoadReport:
    """Stream a DeepSeek-V2 (or our exported) checkpoint into an already-built ``model``."""
    ckpt = path if isinstance(path, CheckpointDir) else CheckpointDir(path)
    fields, _ = architecture_fields(ckpt, upcycle=False)
    stats = load_routing_stats(routing_stats) if isinstance(routing_stats, (str, os.PathLike)) else routing_stats
    if checkpoint_kind(ckpt) == "most" and layout != "index":
        raise CheckpointError(f"{ckpt.path}: a MoST export is reloaded as it is; init.partition={layout!r} applies "
                              "to DeepSeek-V2 imports only")
    _check_architecture(model.config, fields, ckpt, exclude=("vocab_size", "n_routed_experts", "initializer_range"))
    plan = deepseek_plan(model, ckpt, ckpt.config.get(MOST_KEY, ckpt.config)["n_routed_experts"], layout, stats,
                         new_token_rows)
    return run_plan(plan, ckpt, model, progress, reader)


def upcycle_weights(model: MoSTForCausalLM, path: str | os.PathLike | CheckpointDir, router_init: str = "normal",
                    new_token_rows: str = "mean", progress: bool = True) -> LoadReport:
    """Stream a dense Llama checkpoint into an already-built MoE ``model`` (see upcycle.py)."""
    ckpt = path if isinstance(path, CheckpointDir) else CheckpointDir(path)
    fields, _ = architecture_fields(ckpt, upcycle=True)
    _check_architecture(model.config, fields, ckpt, exclude=("vocab_size", "intermediate_size", "initializer_range"))
    plan = llama_upcycle_plan(model, ckpt, router_init, new_token_rows)
    return run_plan(plan, ckpt, model, progress)


def _check_architecture(config: MoSTConfig, fields: dict, ckpt: CheckpointDir, exclude: tuple[str, ...]) -> None:
    wrong = [f"{k}: model {getattr(config, k)!r}, checkpoint {v!r}" for k, v in fields.items()
             if k not in exclude and k not in MOST_CHOICES and k in {f.name for f in dataclasses.fields(config)}
             and getattr(config, k) != v]
    if wrong:
        raise CheckpointError(f"{ckpt.path}: the model's architecture differs from config.json: " + "; ".join(wrong)
                              + ". Build the model from the checkpoint (load_pretrained / model.init.*) instead.")


def pretrained_config(path: str | os.PathLike | CheckpointDir, *, upcycle: bool = False, layout: str = "index",
                      router: dict | RouterConfig | None = None, **choices: Any) -> MoSTConfig:
    """The MoSTConfig of a model built from this checkpoint: architecture from config.json, ``choices``
    (audio_expert_fraction, partition, expert_dispatch, vocab_size >= the checkpoint's, and for upcycling the
    MoE fields UPCYCLE_CHOICES) from the caller, router from the caller or else the checkpoint's routing."""
    ckpt = path if isinstance(path, CheckpointDir) else CheckpointDir(path)
    fields, ckpt_router = architecture_fields(ckpt, upcycle, layout)
    allowed = set(MOST_CHOICES) | {"vocab_size", "initializer_range"} | (set(UPCYCLE_CHOICES) if upcycle else set())
    unknown = sorted(set(choices) - allowed)
    if unknown:
        raise CheckpointError(f"{sorted(unknown)} are fixed by {ckpt.path / 'config.json'}; settable: {sorted(allowed)}")
    if upcycle:
        missing = [k for k in UPCYCLE_CHOICES if k not in choices]
        if missing:
            raise CheckpointError(f"upcycling needs the MoE design: {missing} (model group fields)")
    vocab = max(int(choices.pop("vocab_size", 0) or 0), fields["vocab_size"])
    if router is None:
        router = ckpt_router or {"name": "vanilla"}
    return MoSTConfig(**{**fields, **choices, "vocab_size": vocab, "router": router})


def load_pretrained(path: str | os.PathLike, *, layout: str = "index", routing_stats=None,
                    router: dict | RouterConfig | None = None, dtype: torch.dtype | None = None,
                    new_token_rows: str = "mean", progress: bool = True, reader: str = "read",
                    **choices: Any) -> tuple[MoSTForCausalLM, LoadReport]:
    """A MoST model imported from a DeepSeek-V2 HF directory or our own export (see ``pretrained_config``)."""
    ckpt = CheckpointDir(path)
    model = empty_model(pretrained_config(ckpt, layout=layout, router=router, **choices), dtype)
    return model, import_weights(model, ckpt, layout, routing_stats, new_token_rows, progress, reader)


def upcycle_pretrained(path: str | os.PathLike, *, router: dict | RouterConfig | None = None,
                       router_init: str = "normal", dtype: torch.dtype | None = None, new_token_rows: str = "mean",
                       progress: bool = True, **choices: Any) -> tuple[MoSTForCausalLM, LoadReport]:
    """A MoST MoE model upcycled from a dense Llama HF directory (see upcycle.py for the identity rule)."""
    ckpt = CheckpointDir(path)
    model = empty_model(pretrained_config(ckpt, upcycle=True, router=router, **choices), dtype)
    return model, upcycle_weights(model, ckpt, router_init, new_token_rows, progress)
