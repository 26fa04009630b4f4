"""The ``init:`` node of the Hydra model group: where a model's weights come from before training.

    model:
      init:
        from_pretrained: null   # DeepSeek-V2 / V2-Lite HF dir (or a MoST export): import
        upcycle_from: null      # dense Llama HF dir: upcycle to MoE (n_routed_experts, top_k, ... from the group)
        partition: index        # which pretrained expert each MoST expert starts from: index | copy | by_routing_stats
        routing_stats: null     # by_routing_stats: safetensors file from save_routing_stats
        router_init: normal     # upcycling: router gate init, normal | zeros
        new_token_rows: mean    # vocabulary rows the checkpoint lacks (appended unit/audio tokens): mean | normal

Two steps. ``resolve_model_init`` (when the Lightning module is built) reads only config.json: the architecture
comes from the checkpoint, the MoST choices (audio_expert_fraction, partition, expert_dispatch; for upcycling
also the MoE design) from the group, the vocabulary is max(tokenizer, checkpoint). Group values the checkpoint
overrides are logged. The resolved group is what the Lightning checkpoint stores (``_resolved: true``), so a
saved run reloads without the pretrained directory. ``apply_model_init`` streams the weights in (the module's
``setup``, once, skipped when weights come from a Lightning checkpoint).
"""

from __future__ import annotations

import logging
from typing import Any

from most_lightning.model.checkpoint.api import (
    MOST_CHOICES,
    UPCYCLE_CHOICES,
    architecture_fields,
    import_weights,
    upcycle_weights,
)
from most_lightning.model.checkpoint.files import CheckpointDir, CheckpointError
from most_lightning.model.checkpoint.loader import LoadReport

log = logging.getLogger(__name__)

INIT_DEFAULTS: dict[str, Any] = dict(from_pretrained=None, upcycle_from=None, partition="index", routing_stats=None,
                                     router_init="normal", new_token_rows="mean")


def init_settings(group: dict) -> dict[str, Any]:
    init = dict(group.get("init") or {})
    unknown = sorted(set(init) - set(INIT_DEFAULTS) - {"_resolved"})
    if unknown:
        raise CheckpointError(f"model.init has unknown keys {unknown}; allowed: {sorted(INIT_DEFAULTS)}")
    settings = {**INIT_DEFAULTS, **{k: v for k, v in init.items() if v is not None}}
    if settings["from_pretrained"] and settings["upcycle_from"]:
        raise CheckpointError("model.init.from_pretrained and model.init.upcycle_from are both set; choose one")
    return settings


def wants_weights(group: dict) -> bool:
    s = init_settings(group)
    return bool(s["from_pretrained"] or s["upcycle_from"])


def resolve_model_init(group: dict, vocab_size: int | None) -> tuple[dict, int | None]:
    """(model group with the checkpoint's architecture filled in, vocabulary size for the model)."""
    settings = init_settings(group)
    if not wants_weights(group) or settings.get("_resolved"):
        return group, vocab_size
    upcycle = bool(settings["upcycle_from"])
    path = settings["upcycle_from"] or settings["from_pretrained"]
    ckpt = CheckpointDir(path)
    fields, _ = architecture_fields(ckpt, upcycle, settings["partition"])
    kept = set(MOST_CHOICES) | (set(UPCYCLE_CHOICES) if upcycle else set())
    resolved = {k: v for k, v in group.items() if k in kept and v is not None}
    replaced = [f"{k}={group[k]!r} -> {v!r}" for k, v in fields.items()
                if k not in kept and k != "vocab_size" and group.get(k) is not None and group[k] != v]
    if replaced:
        log.warning(f"model.init: architecture taken from {ckpt.path / 'config.json'}; model group values replaced: "
                    + ", ".join(replaced))
    if group.get("preset"):
        log.info(f"model.init: preset {group['preset']!r} not used; the checkpoint defines the architecture")
    for k, v in fields.items():
        if k not in kept and k != "vocab_size":
            resolved[k] = v
    resolved["init"] = {**settings, "_resolved": True}
    return resolved, max(int(vocab_size or 0), int(fields["vocab_size"]))


def apply_model_init(model, group: dict, progress: bool = True) -> LoadReport | None:
    """Load the weights the ``init`` node names into an already-built model (None if it names none)."""
    s = init_settings(group)
    if s["from_pretrained"]:
        return import_weights(model, s["from_pretrained"], s["partition"], s["routing_stats"], s["new_token_rows"],
                              progress)
    if s["upcycle_from"]:
        return upcycle_weights(model, s["upcycle_from"], s["router_init"], s["new_token_rows"], progress)
    return None
