"""Which pretrained expert each MoST expert starts from, on import (``model.init.partition``).

The model's partition (``model.partition``, most_lightning.model.partition) says which expert POSITIONS form
the text and the audio group. An expert layout says which CHECKPOINT expert is copied into each position:

- ``index`` (reference, docs/model_spec.md section 2.1): position j <- checkpoint expert j. With the index
  partition the text group gets experts 0..E-n_audio-1 and the audio group the rest, as in MoST.
- ``copy``: both groups get ALL pretrained experts: the model has 2E experts, text positions <- experts
  0..E-1, audio positions <- copies of experts 0..E-1 (gate rows copied too). Needs audio_expert_fraction 0.5.
  With an in-group softmax (router.mask=logits) each modality then routes exactly as the pretrained model; with
  the reference probability mask every routed weight is halved (each expert's probability is shared with its
  copy), which router.routed_scaling_factor=2 undoes exactly.
- ``by_routing_stats``: per MoE layer, the n_audio experts that audio tokens prefer most (measured routing
  stats of the pretrained model on speech data, see ``measure_routing_stats``) go to the audio positions, the
  rest to the text positions: a per-layer permutation, so a vanilla-routed model computes the same function.

Each layout returns, per MoE layer, ``sources[m]`` = the checkpoint expert copied into model expert m.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from most_lightning.model.checkpoint.files import CheckpointError
from most_lightning.model.partition import AUDIO, TEXT, ExpertPartition

# layout(n_ckpt_experts, partition, stats of this layer or None) -> sources per model expert
ExpertLayout = Callable[[int, ExpertPartition, torch.Tensor | None], list[int]]


def _index(n_ckpt: int, partition: ExpertPartition, stats: torch.Tensor | None) -> list[int]:
    if partition.n_experts != n_ckpt:
        raise CheckpointError(f"init.partition=index keeps the checkpoint's {n_ckpt} experts, but the model has "
                              f"{partition.n_experts}; leave model.n_routed_experts to the checkpoint")
    return list(range(n_ckpt))


def _copy(n_ckpt: int, partition: ExpertPartition, stats: torch.Tensor | None) -> list[int]:
    if len(partition.text) != n_ckpt or len(partition.audio) != n_ckpt:
        raise CheckpointError(
            f"init.partition=copy gives each group all {n_ckpt} checkpoint experts: the model needs "
            f"{2 * n_ckpt} experts with audio_expert_fraction 0.5, not {len(partition.text)} text + "
            f"{len(partition.audio)} audio")
    sources = [0] * partition.n_experts
    for group in (partition.text, partition.audio):
        for j, position in enumerate(sorted(group)):
            sources[position] = j
    return sources


def _by_routing_stats(n_ckpt: int, partition: ExpertPartition, stats: torch.Tensor | None) -> list[int]:
    """stats [2, E]: fraction of text / audio tokens routed to each expert. Audio preference = audio load -
    text load; the len(audio group) most audio-preferring experts (ties: lower index first) go to the audio
    positions in ascending expert order, the rest to the text positions."""
    _index(n_ckpt, partition, stats)
    if stats is None:
        raise CheckpointError("init.partition=by_routing_stats needs init.routing_stats=<file> (written by "
                              "most_lightning.model.checkpoint.save_routing_stats)")
    if tuple(stats.shape) != (2, n_ckpt):
        raise CheckpointError(f"routing stats of shape {list(stats.shape)}; expected [2, {n_ckpt}] (text, audio load)")
    preference = (stats[AUDIO] - stats[TEXT]).double()
    order = sorted(range(n_ckpt), key=lambda e: (-float(preference[e]), e))
    audio = sorted(order[:len(partition.audio)])
    text = sorted(order[len(partition.audio):])
    sources = [0] * n_ckpt
    for positions, experts in ((partition.text, text), (partition.audio, audio)):
        for position, expert in zip(sorted(positions), experts):
            sources[position] = expert
    return sources


EXPERT_LAYOUTS: dict[str, ExpertLayout] = {"index": _index, "copy": _copy, "by_routing_stats": _by_routing_stats}


def model_experts_for(layout: str, n_ckpt: int) -> int:
    """Number of routed experts the MoST model gets under ``layout``."""
    return 2 * n_ckpt if layout == "copy" else n_ckpt


def expert_sources(layout: str, n_ckpt: int, partition: ExpertPartition, moe_layers: Iterable[int],
                   stats: Mapping[int, torch.Tensor] | None = None) -> dict[int, list[int]]:
    if layout not in EXPERT_LAYOUTS:
        raise CheckpointError(f"model.init.partition={layout!r}: allowed values are {sorted(EXPERT_LAYOUTS)}")
    out = {}
    for layer in moe_layers:
        layer_stats = None
        if stats is not None:
            if layer not in stats:
                raise CheckpointError(f"routing stats have no entry for MoE layer {layer} (have {sorted(stats)})")
            layer_stats = stats[layer]
        out[layer] = EXPERT_LAYOUTS[layout](n_ckpt, partition, layer_stats)
    return out


# ---------------------------------------------------------------------------- routing statistics
@torch.no_grad()
def measure_routing_stats(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Per MoE layer, [2, E] = fraction of text / audio tokens routed to each expert, over ``batches``
    (dicts with input_ids, modality and optionally attention_mask). Run it on the pretrained model with the
    vanilla router, on speech data (audio tokens with their modality marks)."""
    config = model.config
    layers = [i for i in range(config.num_layers) if config.is_moe_layer(i)]
    counts = {i: torch.zeros(2, config.n_routed_experts, dtype=torch.float64) for i in layers}
    tokens = torch.zeros(2, dtype=torch.float64)
    model.eval()
    for batch in batches:
        out = model(batch["input_ids"], batch["modality"], attention_mask=batch.get("attention_mask"))
        for layer, stats in zip(layers, out.router_stats):
            counts[layer] += stats.load.double() * stats.tokens.double()[:, None]
        tokens += out.router_stats[0].tokens.double()
    return {layer: (c / tokens.clamp(min=1)[:, None]).float() for layer, c in counts.items()}


def save_routing_stats(stats: Mapping[int, torch.Tensor], path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    save_file({f"layer.{i}": s.contiguous() for i, s in stats.items()}, os.fspath(path))


def load_routing_stats(path: str | os.PathLike) -> dict[int, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"init.routing_stats={str(path)!r}: no such file")
    try:
        raw = load_file(os.fspath(path))
    except Exception as err:
        raise CheckpointError(f"{path}: not a routing-stats safetensors file ({err})") from None
    bad = [k for k in raw if not (k.startswith("layer.") and k[6:].isdigit())]
    if bad:
        raise CheckpointError(f"{path}: unexpected keys {bad[:4]}; expected 'layer.<i>' -> [2, E] tensors")
    return {int(k[6:]): v for k, v in raw.items()}
