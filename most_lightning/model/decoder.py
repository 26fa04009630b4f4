"""The MoST decoder: embeddings -> [attention + (dense SwiGLU | modality-aware MoE)] x L -> norm -> LM head.

Module names follow the HF DeepSeek-V2 checkpoint layout (``model.layers.{i}.self_attn.*``, ``.mlp.*``) so
weights map one to one. Only the MoE feed-forward layers read the modality marks (docs/model_spec.md section 2.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from most_lightning.model.attention import KVCache, build_attention
from most_lightning.model.config import MoSTConfig
from most_lightning.model.experts import GroupedExperts, SwiGLU
from most_lightning.model.moe import MoELayer
from most_lightning.model.norm import RMSNorm
from most_lightning.model.packing import PackedRows, segment_positions, several_per_row
from most_lightning.model.rope import RotaryEmbedding
from most_lightning.model.router import Router, RouterStats, router_class
from most_lightning.model.token_losses import TokenLosses, fused_token_losses, shifted_token_losses


@dataclass
class MoSTOutput:
    """What one forward returns. With labels, the loss parts: ``lm_loss`` (token mean over the supervised
    positions), its breakdowns ``lm_loss_by_modality()`` / ``lm_loss_by_task()``, the per-token ``token_losses``
    (sums and counts for metrics accumulated over batches), and the routers' ``aux_losses`` (already weighted);
    ``loss`` is the optimised total, lm_loss + aux_loss."""

    logits: torch.Tensor | None  # None when forward(compute_logits=False)
    aux_loss: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    router_stats: list[RouterStats] = field(default_factory=list)
    past_key_values: KVCache | None = None
    hidden: torch.Tensor | None = None  # final-norm hidden states [B, T, H], the LM head's input
    token_losses: TokenLosses | None = None  # only when labels were given

    def _lm(self) -> TokenLosses:
        if self.token_losses is None:
            raise ValueError("no LM loss: call the model with labels=[B, T] (-100 = not supervised)")
        return self.token_losses

    @property
    def lm_loss(self) -> torch.Tensor:
        return self._lm().mean()

    @property
    def loss(self) -> torch.Tensor:
        return self.lm_loss + self.aux_loss

    def lm_loss_by_modality(self) -> dict[str, torch.Tensor]:
        """{text, audio: token-mean NLL} by the modality of the target token (modalities without targets left out)."""
        return self._lm().by_modality()

    def lm_loss_by_task(self) -> dict[str, torch.Tensor]:
        """{task: token-mean NLL} for the tasks of the rows (forward(tasks=...))."""
        return self._lm().by_task()


def _plain_weight(linear: nn.Linear) -> bool:
    """The fused loss reads lm_head.weight outside lm_head's forward: only safe when the weight is an ordinary
    whole tensor (not a ZeRO-3 partition or a sharded DTensor, which only their module's forward gathers)."""
    weight = linear.weight
    return type(weight) is nn.Parameter and not hasattr(weight, "ds_id") and weight.shape == (
        linear.out_features, linear.in_features)


class DecoderLayer(nn.Module):
    def __init__(self, config: MoSTConfig, layer_idx: int):
        super().__init__()
        self.self_attn = build_attention(config, layer_idx)
        self.mlp = (MoELayer(config) if config.is_moe_layer(layer_idx)
                    else SwiGLU(config.hidden_size, config.intermediate_size))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, modality, cos, sin, mask, cache, token_mask, segment_ids=None):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, mask, cache)
        normed = self.post_attention_layernorm(hidden)
        if isinstance(self.mlp, MoELayer):
            out, routing = self.mlp(normed, modality, token_mask, segment_ids)
            return hidden + out, routing
        return hidden + self.mlp(normed), None


class MoSTModel(nn.Module):
    def __init__(self, config: MoSTConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        rope_dim = config.qk_rope_head_dim if config.attention == "mla" else (
            config.head_dim or config.hidden_size // config.num_heads)
        self.rotary = RotaryEmbedding(rope_dim, config.rope_theta, config.rope_scaling)


def _is_right_padded(attention_mask: torch.Tensor) -> bool:
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def _attention_mask(attention_mask: torch.Tensor | None, q_len: int, past: int) -> torch.Tensor | None:
    """Bool [B, 1, Tq, Tk] = causal & key not padding; None when plain causal attention suffices."""
    if past == 0 and (attention_mask is None or _is_right_padded(attention_mask)):
        return None  # real tokens never see right padding under a causal mask
    k_len = past + q_len
    device = attention_mask.device if attention_mask is not None else None
    q_pos = torch.arange(past, k_len, device=device)[:, None]
    causal = torch.arange(k_len, device=device)[None, :] <= q_pos  # [Tq, Tk]
    if attention_mask is None:
        return causal[None, None]
    mask = causal[None] & attention_mask[:, None, :k_len].bool()
    # A padding query whose keys are all padding would get NaN; let every position see itself.
    mask |= torch.arange(k_len, device=device)[None, None, :] == q_pos[None]
    return mask[:, None]


class MoSTForCausalLM(nn.Module):
    # forward(labels=..., compute_logits=False) takes the fused chunked LM-head loss (False: logits + cross
    # entropy, the same values; model/token_losses.py)
    fused_loss = True

    def __init__(self, config: MoSTConfig):
        super().__init__()
        self.config = config
        self.model = MoSTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # a router that uses the text/audio expert partition needs the marks: no silent "all text"
        self._modality_required = config.has_moe and router_class(config.router.name).uses_partition
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """HF DeepSeek init: normal(0, initializer_range) for every matrix, ones for norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, Router):
                module.reset_parameters(std)
            elif isinstance(module, GroupedExperts):
                for param in module.parameters(recurse=False):
                    nn.init.normal_(param, std=std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, H] of input_ids: the input to splice other frames into (inputs_embeds)."""
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, modality: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                inputs_embeds: torch.Tensor | None = None, compute_logits: bool = True,
                segment_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                tasks: Sequence[str] | None = None) -> MoSTOutput:
        """input_ids/modality/position_ids [B, T]; attention_mask [B, past + T] bool (True = real token).
        segment_ids [B, T]: packed rows (data.batching=pack), numbering the examples of a row (0 = padding):
        each token attends only within its example, positions restart at every example and the balance loss
        takes every example as a sequence (no cache).
        inputs_embeds [B, T, H]: used instead of embedding input_ids (e.g. with spliced audio frames).
        labels [B, T] (aligned with input_ids, -100 = not supervised): the output carries the LM loss and its
        breakdowns (MoSTOutput); tasks: the task of each row, for lm_loss_by_task.
        compute_logits=False skips the whole-sequence LM head; with labels the loss then runs the LM head on the
        supervised positions only, chunk by chunk (model/loss.py)."""
        batch, seq = input_ids.shape
        if modality is None:
            if self._modality_required:
                raise ValueError(f"modality is required: router {self.config.router.name!r} routes each token to "
                                 "its modality's experts; pass modality [B, T] (0 text, 1 audio)")
            modality = torch.zeros_like(input_ids)
        if modality.shape != input_ids.shape:
            raise ValueError(f"modality marks {tuple(modality.shape)} must match input_ids {tuple(input_ids.shape)}")
        if use_cache and past_key_values is None:
            past_key_values = KVCache(self.config.num_layers)
        past = past_key_values.seq_len if past_key_values is not None else 0
        if past + seq > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past + seq} tokens exceeds model.max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if segment_ids is not None and segment_ids.shape != input_ids.shape:
            raise ValueError(f"segment_ids {tuple(segment_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
        if segment_ids is not None and past > 0:
            raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache: generate per example")
        if position_ids is None:
            position_ids = (segment_positions(segment_ids) if segment_ids is not None
                            else torch.arange(past, past + seq, device=input_ids.device).expand(batch, -1))

        if inputs_embeds is not None and inputs_embeds.shape[:2] != input_ids.shape:
            raise ValueError(f"inputs_embeds {tuple(inputs_embeds.shape)} must match input_ids {tuple(input_ids.shape)}")
        hidden = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.model.rotary(position_ids, hidden.dtype)
        if segment_ids is not None and several_per_row(segment_ids):
            mask = PackedRows.from_segments(segment_ids)
        else:  # one example per row: the plain causal mask already keeps examples apart
            mask = _attention_mask(attention_mask, seq, past)
        token_mask = attention_mask[:, past:] if attention_mask is not None else None

        aux_losses: dict[str, torch.Tensor] = {}
        stats: list[RouterStats] = []
        for layer in self.model.layers:
            hidden, routing = layer(hidden, modality, cos, sin, mask, past_key_values, token_mask, segment_ids)
            if routing is not None:
                stats.append(routing.stats)
                for name, value in routing.aux_losses.items():
                    aux_losses[name] = aux_losses.get(name, 0) + value
        hidden = self.model.norm(hidden)
        logits = self.lm_head(hidden) if compute_logits else None
        token_losses = None
        if labels is not None:
            logits, token_losses = self._lm_losses(hidden, logits, labels, modality, tasks)
        aux_loss = sum(aux_losses.values()) if aux_losses else hidden.new_zeros(())
        return MoSTOutput(logits=logits if compute_logits else None, aux_loss=aux_loss, aux_losses=aux_losses,
                          router_stats=stats, past_key_values=past_key_values if use_cache else None, hidden=hidden,
                          token_losses=token_losses)

    def _lm_losses(self, hidden: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor,
                   modality: torch.Tensor, tasks: Sequence[str] | None) -> tuple[torch.Tensor | None, TokenLosses]:
        """(logits, per-token LM loss). Without logits, the fused loss when the LM-head weight can be read
        whole here, else the LM head on every position."""
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(hidden.shape[:2])}")
        if tasks is not None and len(tasks) != labels.shape[0]:
            raise ValueError(f"tasks names {len(tasks)} rows but the batch has {labels.shape[0]}")
        if logits is None and self.fused_loss and _plain_weight(self.lm_head):
            losses = fused_token_losses(hidden, self.lm_head.weight, labels, modality)
        else:
            logits = self.lm_head(hidden) if logits is None else logits
            losses = shifted_token_losses(logits, labels, modality)
        losses.tasks = None if tasks is None else list(tasks)
        return logits, losses

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, input_ids, modality, attention_mask=None, max_new_tokens: int = 64, *, eos_id: int,
                 pad_id: int | None = None, modality_of=None, inputs_embeds=None) -> torch.Tensor:
        from most_lightning.model.generation import greedy_generate

        return greedy_generate(self, input_ids, modality, attention_mask, max_new_tokens, eos_id=eos_id,
                               pad_id=pad_id, modality_of=modality_of, inputs_embeds=inputs_embeds)
