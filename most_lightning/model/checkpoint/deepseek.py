"""DeepSeek-V2 / V2-Lite HF checkpoints -> MoST: the load plan (key mapping, both expert layouts).

Our module names follow the HF DeepSeek-V2 layout, so attention, norms, dense FFN, gate and shared experts map
one to one. Routed experts are stacked in our model ([E, I, H]); the checkpoint holds them either per expert
(``mlp.experts.{j}.{gate,up,down}_proj.weight``, the original DeepSeek repo and transformers' save_pretrained)
or fused (transformers' in-memory layout: ``mlp.experts.gate_up_proj`` [E, 2I, H] = gate over up,
``mlp.experts.down_proj`` [E, H, I]); each MoE layer may use either. The expert layout
(expert_layout.py) says which checkpoint expert fills each model expert; gate rows follow their experts.
"""

from __future__ import annotations

import logging

import torch

from most_lightning.model.checkpoint.expert_layout import expert_sources
from most_lightning.model.checkpoint.files import CheckpointDir
from most_lightning.model.checkpoint.loader import Assign, LoadPlan, model_tensors
from most_lightning.model.checkpoint.router_state import plan_router_state, router_state_names
from most_lightning.model.checkpoint.vocab import plan_vocab_rows
from most_lightning.model.decoder import MoSTForCausalLM
from most_lightning.model.partition import expert_partition

log = logging.getLogger(__name__)

# Keys some DeepSeek checkpoints carry that hold nothing to load (rope tables are recomputed).
IGNORED = ("*.rotary_emb.inv_freq", "*rotary_emb*")
EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")


def _rows(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def plan_experts(plan: LoadPlan, ckpt: CheckpointDir, prefix: str, sources: list[int], shapes: dict[str, tuple]) -> None:
    """Routed experts + gate of one MoE layer. prefix 'model.layers.{i}.mlp'; shapes: our [E, ...] shapes."""
    target = f"{prefix}.experts"
    n_ckpt = 1 + max(sources)
    have = ckpt.tensors_info
    fused = f"{target}.gate_up_proj" in have or f"{target}.down_proj" in have
    _, inter, hidden = shapes["gate_proj"]
    if fused:
        src = _rows(sources)
        plan.add(f"{target}.gate_up_proj", (n_ckpt, 2 * inter, hidden),
                 Assign(f"{target}.gate_proj", take=lambda t: t[src, :inter]),
                 Assign(f"{target}.up_proj", take=lambda t: t[src, inter:]))
        plan.add(f"{target}.down_proj", (n_ckpt, hidden, inter), Assign(f"{target}.down_proj", take=lambda t: t[src]))
    else:
        for j in sorted(set(sources)):
            rows = _rows([m for m, s in enumerate(sources) if s == j])
            copies = lambda t, n=len(rows): t.unsqueeze(0).expand(n, *t.shape)  # noqa: E731 (one expert -> n rows)
            for name in EXPERT_PARAMS:
                plan.add(f"{target}.{j}.{name}.weight", tuple(shapes[name][1:]),
                         Assign(f"{target}.{name}", rows=rows, take=copies))
    src = _rows(sources)
    plan.add(f"{prefix}.gate.weight", (n_ckpt, hidden), Assign(f"{prefix}.gate.weight", take=lambda t: t[src]))


def deepseek_plan(model: MoSTForCausalLM, ckpt: CheckpointDir, n_ckpt_experts: int, layout: str = "index",
                  routing_stats: dict[int, torch.Tensor] | None = None, new_token_rows: str = "mean") -> LoadPlan:
    c = model.config
    plan = LoadPlan(ignore=IGNORED)
    tensors = model_tensors(model)
    if c.tie_word_embeddings:  # tied: some checkpoints still carry the duplicate head
        plan.ignore += ("lm_head.weight",)
    if not c.n_shared_experts:  # our exports write zero-size shared experts for transformers (export.py)
        plan.ignore += tuple(k for k, info in ckpt.tensors_info.items()
                             if ".mlp.shared_experts." in k and 0 in tuple(info.shape))
    ckpt_vocab = ckpt.config["vocab_size"]
    moe_layers = [i for i in range(c.num_layers) if c.is_moe_layer(i)]
    sources = {}
    router_owned = router_state_names(model)
    plan_router_state(plan, model, ckpt, tensors)
    if moe_layers:
        partition = expert_partition(c.n_routed_experts, c.audio_expert_fraction, c.top_k, c.partition)
        sources = expert_sources(layout, n_ckpt_experts, partition, moe_layers, routing_stats)
    for name, tensor in tensors.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            plan_vocab_rows(plan, name, name, (ckpt_vocab, c.hidden_size), tensor.shape[0], new_token_rows,
                            c.initializer_range)
        elif ".mlp.experts." in name or name.endswith(".mlp.gate.weight") or name in router_owned:
            continue  # per layer below; router-owned tensors above
        else:
            plan.add(name, tuple(tensor.shape), Assign(name))
    for layer, layer_sources in sources.items():
        prefix = f"model.layers.{layer}.mlp"
        shapes = {p: tuple(tensors[f"{prefix}.experts.{p}"].shape) for p in EXPERT_PARAMS}
        plan_experts(plan, ckpt, prefix, layer_sources, shapes)
    if layout != "index" and sources:
        first = moe_layers[0]
        plan.notes.append(f"expert layout {layout!r}: layer {first} model experts <- checkpoint experts "
                          f"{sources[first]}")
    return plan
