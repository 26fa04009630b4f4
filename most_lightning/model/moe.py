"""The MoE feed-forward layer: router + routed experts (+ shared experts), built by composition.

y = routed(h) + shared(h). The layer does not know which routing strategy it holds; the modality marks only
pass through to the router.
"""

from __future__ import annotations

import torch
from torch import nn

from most_lightning.model.config import MoSTConfig
from most_lightning.model.experts import GroupedExperts, SwiGLU
from most_lightning.model.router import Routing, build_router


class MoELayer(nn.Module):
    def __init__(self, config: MoSTConfig):
        super().__init__()
        self.gate = build_router(config)
        self.experts = GroupedExperts(config.hidden_size, config.moe_intermediate_size, config.n_routed_experts,
                                      dispatch=config.expert_dispatch)
        self.shared_experts = (SwiGLU(config.hidden_size, config.shared_intermediate_size)
                               if config.n_shared_experts > 0 else None)

    def forward(self, hidden: torch.Tensor, modality: torch.Tensor, token_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """hidden [B, T, H], modality [B, T]; token_mask [B, T] excludes padding from the routing stats;
        segment_ids [B, T] marks the examples of packed rows (balance loss per example)."""
        shape = hidden.shape
        routing = self.gate(hidden, modality, token_mask, segment_ids)
        flat = hidden.reshape(-1, shape[-1])
        out = self.experts(flat, routing.indices, routing.weights.to(hidden.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape), routing
