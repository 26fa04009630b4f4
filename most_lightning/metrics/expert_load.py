"""Expert load per modality, aggregated from the model's per-layer RouterStats.

RouterStats (contract): load [2, E] = fraction of modality m's tokens routed to expert e (rows sum to top_k),
tokens [2] = tokens per modality. Summed as routing-slot counts so batches of any size combine exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from most_lightning.marks import MODALITY_NAMES


class ExpertLoadAccumulator:
    """Running routing-slot counts [layers, modality, expert] and token counts [layers, modality]."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None  # [L, 2, E] float64
        self.tokens: torch.Tensor | None = None  # [L, 2] float64

    @property
    def empty(self) -> bool:
        return self.slots is None or float(self.tokens.sum()) == 0.0

    def reset(self) -> None:
        self.slots = self.tokens = None

    @torch.no_grad()
    def update(self, router_stats: Sequence) -> None:
        if not router_stats:
            return
        load = torch.stack([s.load.detach() for s in router_stats]).double()  # [L, 2, E]
        tokens = torch.stack([s.tokens.detach() for s in router_stats]).double()  # [L, 2]
        slots = load * tokens[..., None]
        if self.slots is None:
            self.slots, self.tokens = slots, tokens
        else:
            self.slots, self.tokens = self.slots + slots, self.tokens + tokens

    def reduced(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> "ExpertLoadAccumulator":
        """A copy with counts summed over processes by `reduce` (e.g. the Lightning strategy's reduce)."""
        out = ExpertLoadAccumulator()
        if self.slots is not None:
            out.slots = reduce(self.slots.clone()) if reduce else self.slots.clone()
            out.tokens = reduce(self.tokens.clone()) if reduce else self.tokens.clone()
        return out

    def load_fraction(self) -> torch.Tensor:
        """[L, 2, E]: fraction of each modality's tokens routed to each expert (rows sum to top_k; 0 if no token)."""
        if self.slots is None:
            raise RuntimeError("no router statistics accumulated yet")
        return self.slots / self.tokens[..., None].clamp(min=1)

    def summary(
        self, audio_experts: Sequence[int] | None = None, layer_ids: Sequence[int] | None = None
    ) -> dict[str, float]:
        """Compact scalars: per modality and per layer max-over-mean load, and the in-group fractions.

        load_max_over_mean_<mod> (mean over layers): 1.0 = perfectly even over ALL routed experts; a
        modality confined to half of the experts scores >= 2 by construction.
        audio_to_audio_group / text_to_text_group: fraction of that modality's routing slots that land in its
        own expert group (1.0 under modality-aware routing, about the group's share under vanilla routing).
        """
        if self.empty:
            return {}
        frac = self.load_fraction()
        n_layers, _, n_experts = frac.shape
        layer_ids = list(layer_ids) if layer_ids is not None else list(range(n_layers))
        out: dict[str, float] = {}
        for m, name in enumerate(MODALITY_NAMES):
            has_tokens = self.tokens[:, m] > 0
            if not bool(has_tokens.any()):
                continue
            ratio = frac[:, m].max(-1).values / frac[:, m].mean(-1).clamp(min=1e-12)
            out[f"load_max_over_mean_{name}"] = float(ratio[has_tokens].mean())
            for i, layer in enumerate(layer_ids):
                if has_tokens[i]:
                    out[f"load_max_over_mean_{name}/layer_{layer}"] = float(ratio[i])
            out[f"tokens_{name}"] = float(self.tokens[0, m])
        if audio_experts is not None:
            is_audio = torch.zeros(n_experts, dtype=torch.bool, device=frac.device)
            is_audio[list(audio_experts)] = True
            for m, name, group in ((1, "audio", is_audio), (0, "text", ~is_audio)):
                total = self.slots[:, m].sum()
                if float(total) > 0:
                    out[f"{name}_to_{name}_group"] = float(self.slots[:, m][:, group].sum() / total)
        return out
