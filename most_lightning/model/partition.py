"""Which routed experts belong to the text group and which to the audio group.

A partition strategy maps (n_experts, audio fraction) to two disjoint index sets covering all experts. The
reference (docs/model_spec.md section 2.1) is the index split: text experts first, audio experts after them.
Shared experts are outside the partition: every token of every modality uses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from most_lightning.marks import AUDIO, MODALITY_NAMES, TEXT  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class ExpertPartition:
    text: tuple[int, ...]
    audio: tuple[int, ...]

    @property
    def n_experts(self) -> int:
        return len(self.text) + len(self.audio)

    def group_mask(self) -> torch.Tensor:
        """Bool [2, E]: row m marks the experts that tokens of modality m may use."""
        mask = torch.zeros(2, self.n_experts, dtype=torch.bool)
        mask[TEXT, list(self.text)] = True
        mask[AUDIO, list(self.audio)] = True
        return mask


def _index_split(n_experts: int, n_audio: int) -> ExpertPartition:
    n_text = n_experts - n_audio
    return ExpertPartition(text=tuple(range(n_text)), audio=tuple(range(n_text, n_experts)))


PARTITIONS: dict[str, Callable[[int, int], ExpertPartition]] = {"index": _index_split}


def expert_partition(n_experts: int, audio_fraction: float, top_k: int, strategy: str = "index") -> ExpertPartition:
    """Split ``n_experts`` routed experts; each group must hold at least ``top_k`` experts."""
    from most_lightning.model.config import ConfigError

    if strategy not in PARTITIONS:
        raise ConfigError(f"model.partition={strategy!r}: allowed values are {sorted(PARTITIONS)}")
    if not 0.0 < audio_fraction < 1.0:
        raise ConfigError(f"model.audio_expert_fraction={audio_fraction} must lie strictly between 0 and 1")
    n_audio = round(n_experts * audio_fraction)
    n_text = n_experts - n_audio
    if min(n_text, n_audio) < top_k:
        lo, hi = top_k / n_experts, 1 - top_k / n_experts
        allowed = f"[{lo:.4g}, {hi:.4g}]" if lo <= hi else "none (top_k is more than half of the experts)"
        raise ConfigError(
            f"model.audio_expert_fraction={audio_fraction} gives {n_text} text and {n_audio} audio experts out of "
            f"{n_experts}, but each group needs at least top_k={top_k}. Allowed fractions: {allowed}; "
            "or lower model.top_k / raise model.n_routed_experts."
        )
    return PARTITIONS[strategy](n_experts, n_audio)
