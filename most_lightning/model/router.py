"""Routers: hidden states + per-token modality in; weights, expert ids, aux losses and stats out.

A router strategy is one class registered by name (``@register_router("name")``) and chosen in
``conf/router/*.yaml``; the MoE layer only sees the ``Router`` interface. The gate itself (a bias-free linear
map hidden -> experts, computed in fp32) is shared by all strategies, so checkpoints load into any of them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from most_lightning.model.config import MoSTConfig, RouterConfig
from most_lightning.model.packing import segment_starts
from most_lightning.model.partition import ExpertPartition, expert_partition


@dataclass
class RouterStats:
    """Detached routing statistics of one MoE layer for one batch.

    load[m, e]: fraction of modality m's tokens that chose expert e (each row sums to top_k, or 0 when the
    batch has no token of that modality); tokens[m]: number of tokens of modality m.
    """

    load: torch.Tensor
    tokens: torch.Tensor


@dataclass
class Routing:
    weights: torch.Tensor  # [N, k] fp32 gate weights of the chosen experts
    indices: torch.Tensor  # [N, k] long expert ids
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # already weighted by their coefficients
    stats: RouterStats | None = None

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return sum(self.aux_losses.values()) if self.aux_losses else None


ROUTERS: dict[str, type["Router"]] = {}


def register_router(name: str) -> Callable[[type["Router"]], type["Router"]]:
    def add(cls: type["Router"]) -> type["Router"]:
        if name in ROUTERS:
            raise ValueError(f"router {name!r} is registered twice ({ROUTERS[name].__name__} and {cls.__name__})")
        ROUTERS[name] = cls
        return cls

    return add


def balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int, top_k: int,
                 segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence balance loss of the reference (MOST_SPEC 2.3), without its alpha.

    scores [B, T, E]: the (masked) routing probabilities; indices [B, T, k]. For sequence b and expert i,
    f = count of i in the top-k over T tokens / (T * k / E), P = mean over tokens of the scores; the loss is
    mean_b sum_i f * P. E counts all routed experts, not the group size.
    segment_ids [B, T] (packed rows): every example of a row is a sequence of its own; segment 0 (the padding
    after the last example) belongs to none.
    """
    batch, tokens, _ = scores.shape
    if segment_ids is None:
        sequence, n_sequences = torch.arange(batch, device=scores.device).repeat_interleave(tokens), batch
    else:  # number the examples 1, 2, ... across the batch, the padding 0 (sizes fixed: no host sync)
        real = segment_ids > 0
        starts = real & segment_starts(segment_ids)
        sequence, n_sequences = (starts.reshape(-1).cumsum(0) * real.reshape(-1)), batch * tokens + 1
    length = torch.zeros(n_sequences, device=scores.device, dtype=scores.dtype)
    length.index_add_(0, sequence, torch.ones_like(sequence, dtype=scores.dtype))
    counts = torch.zeros(n_sequences, n_experts, device=scores.device, dtype=scores.dtype)
    slots = sequence.repeat_interleave(top_k) * n_experts + indices.reshape(-1)
    counts.view(-1).index_add_(0, slots, torch.ones_like(slots, dtype=scores.dtype))
    score_sums = torch.zeros_like(counts).index_add_(0, sequence, scores.reshape(-1, n_experts))
    present = length > 0
    if segment_ids is not None:
        present[0] = False  # the padding
    length = length.clamp(min=1)[:, None]
    per_sequence = (counts / (length * top_k / n_experts) * score_sums / length).sum(dim=1)
    return (per_sequence * present).sum() / present.sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition of the gate logits."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def routing_stats(indices: torch.Tensor, modality: torch.Tensor, n_experts: int,
                  token_mask: torch.Tensor | None = None) -> RouterStats:
    """Fraction of each modality's tokens sent to each expert; masked-out (padding) tokens are ignored."""
    with torch.no_grad():
        modality = modality.reshape(-1).long()
        indices = indices.reshape(modality.numel(), -1)
        keep = (torch.ones_like(modality, dtype=torch.float) if token_mask is None
                else token_mask.reshape(-1).float())
        # index_add with 0/1 weights, not boolean indexing + bincount: no host sync on a GPU
        slots = (modality[:, None] * n_experts + indices).reshape(-1)
        counts = torch.zeros(2 * n_experts, device=keep.device).index_add_(
            0, slots, keep.repeat_interleave(indices.shape[1])).view(2, n_experts)
        tokens = torch.zeros(2, device=keep.device).index_add_(0, modality, keep)
        return RouterStats(load=counts / tokens.clamp(min=1)[:, None], tokens=tokens)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast would run the gate's F.linear in bf16/fp16 whatever its inputs' dtype."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class Router(nn.Module):
    """Gate + a routing rule. Subclasses implement ``select``: scores -> (weights, indices, balance scores)."""

    uses_partition = False

    def __init__(self, hidden_size: int, n_experts: int, top_k: int, cfg: RouterConfig,
                 partition: ExpertPartition | None = None):
        super().__init__()
        self.n_experts, self.top_k, self.cfg = n_experts, top_k, cfg
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        if self.uses_partition:
            if partition is None:
                raise ValueError(f"router {cfg.name!r} needs an expert partition")
            self.register_buffer("group_mask", partition.group_mask(), persistent=False)

    @classmethod
    def from_config(cls, config: MoSTConfig) -> "Router":
        partition = None
        if cls.uses_partition:
            partition = expert_partition(config.n_routed_experts, config.audio_expert_fraction, config.top_k,
                                         config.partition)
        return cls(config.hidden_size, config.n_routed_experts, config.top_k, config.router, partition)

    def select(self, logits: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits [N, E] fp32, modality [N] -> (weights [N, k], indices [N, k], scores for the balance loss)."""
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, modality: torch.Tensor, token_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> Routing:
        """hidden [B, T, H], modality [B, T] (0 text, 1 audio), token_mask [B, T] (stats only), segment_ids [B, T]
        (packed rows: the balance loss takes each example as a sequence)."""
        batch, tokens, hidden_size = hidden.shape
        with _autocast_off(hidden.device.type):  # fp32 logits also in mixed-precision training
            logits = F.linear(hidden.reshape(-1, hidden_size).float(), self.weight.float())
        weights, indices, scores = self.select(logits, modality.reshape(-1))
        if self.cfg.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-20)
        weights = weights * self.cfg.routed_scaling_factor

        aux: dict[str, torch.Tensor] = {}
        if self.cfg.balance_loss_alpha > 0 and self.training:
            aux["balance"] = self.cfg.balance_loss_alpha * balance_loss(
                scores.view(batch, tokens, -1), indices.view(batch, tokens, -1), self.n_experts, self.top_k,
                segment_ids)
        if self.cfg.z_loss_coef > 0 and self.training:
            aux["z"] = self.cfg.z_loss_coef * z_loss(logits)
        stats = routing_stats(indices, modality, self.n_experts, token_mask)
        return Routing(weights=weights, indices=indices, aux_losses=aux, stats=stats)


@register_router("vanilla")
class VanillaRouter(Router):
    """DeepSeek-V2 gate: softmax over all experts, greedy top-k, modality ignored."""

    def select(self, logits, modality):
        scores = logits.softmax(dim=-1)
        weights, indices = torch.topk(scores, self.top_k, dim=-1)
        return weights, indices, scores


@register_router("modality_aware")
class ModalityAwareRouter(Router):
    """MAMoE (MOST_SPEC 2.2): each token may only use its own modality's expert group.

    mask="probs" (reference): softmax over ALL experts, zero the out-of-group probabilities, top-k; the gate
    weights are the raw full-softmax probabilities (sum < 1). mask="logits": -inf on out-of-group logits
    before the softmax, i.e. an in-group softmax.
    """

    uses_partition = True

    def select(self, logits, modality):
        allowed = self.group_mask[modality.long()]  # [N, E]
        if self.cfg.mask == "logits":
            scores = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        else:
            scores = logits.softmax(dim=-1).masked_fill(~allowed, 0.0)
        # Rank out-of-group experts below every in-group one, even if an in-group probability underflows to 0.
        _, indices = torch.topk(scores.masked_fill(~allowed, -1.0), self.top_k, dim=-1)
        weights = scores.gather(1, indices)
        return weights, indices, scores


def build_router(config: MoSTConfig) -> Router:
    return ROUTERS[config.router.name].from_config(config)
