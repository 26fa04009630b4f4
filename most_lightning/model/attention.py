"""Attention: DeepSeek multi-head latent attention (MLA) and plain multi-head / grouped-query attention.

Both take (hidden [B, T, H], cos/sin for the new positions, a boolean mask or None, a KV cache) and return
[B, T, H]. MLA caches the compressed latent (kv_lora_rank) plus the shared rotary key, as DeepSeek-V2 does.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from most_lightning.model.config import MoSTConfig
from most_lightning.model.norm import RMSNorm
from most_lightning.model.packing import PackedRows
from most_lightning.model.rope import apply_rotary, attention_softmax_scale, deinterleave


class KVCache:
    """Per-layer cached tensors, concatenated along the sequence dim (dim 2 of [B, heads, T, d])."""

    def __init__(self, num_layers: int):
        self.layers: list[tuple[torch.Tensor, ...] | None] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first[0].shape[2]

    def update(self, layer_idx: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        old = self.layers[layer_idx]
        full = new if old is None else tuple(torch.cat((o, n), dim=2) for o, n in zip(old, new))
        self.layers[layer_idx] = full
        return full


# On CUDA, SDPA may pick cuDNN's attention, which builds an execution plan for every new shape: 6-15 ms of host
# time per call on an H100. Every batch here has a new length (padding to the longest example, the length
# classes of packed rows, each step of generation), so it made the tiny model's GPU training steps 3.6x (fixed
# batches) to 15x (packed rows) slower than the flash / memory-efficient kernels, which take any shape at no set-up
# cost (docs/training_speed.md, GPU section).
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q, k, v, **kwargs):
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel(_CUDA_SDPA_BACKENDS):  # the backward runs the kernel that the forward chose
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _attend(q, k, v, mask, scale):
    """q [B, h, Tq, d], k/v [B, h, Tk, d]; mask None (causal, no cache), bool [B, 1, Tq, Tk] (True = attend) or
    PackedRows (causal within each example of packed rows)."""
    if mask is None:
        return _sdpa(q, k, v, is_causal=True, scale=scale)
    if isinstance(mask, PackedRows):
        outs = [_sdpa(q_, k_, v_, is_causal=True, scale=scale)
                for q_, k_, v_ in zip(mask.group(q), mask.group(k), mask.group(v))]
        return mask.ungroup(outs, q.shape[0], q.shape[2])
    return _sdpa(q, k, v, attn_mask=mask, scale=scale)


class MultiHeadLatentAttention(nn.Module):
    pad_v_for_fused_kernel = True  # see forward; False is the plain (math-path) computation, for tests

    def __init__(self, config: MoSTConfig, layer_idx: int):
        super().__init__()
        c = config
        linear = partial(nn.Linear, bias=False)
        self.layer_idx, self.num_heads = layer_idx, c.num_heads
        self.nope, self.rope, self.v_dim, self.kv_rank = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        q_out = c.num_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = linear(c.hidden_size, q_out)
        else:
            self.q_a_proj = linear(c.hidden_size, c.q_lora_rank)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = linear(c.q_lora_rank, q_out)
        self.kv_a_proj_with_mqa = linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = linear(c.kv_lora_rank, c.num_heads * (c.qk_nope_head_dim + c.v_head_dim))
        self.o_proj = linear(c.num_heads * c.v_head_dim, c.hidden_size)
        self.scale = attention_softmax_scale(c.qk_head_dim, c.rope_scaling)

    def forward(self, hidden, cos, sin, mask=None, cache: KVCache | None = None):
        batch, seq, _ = hidden.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(batch, seq, self.num_heads, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rot = q.split((self.nope, self.rope), dim=-1)

        latent, k_rot = self.kv_a_proj_with_mqa(hidden).split((self.kv_rank, self.rope), dim=-1)
        latent = self.kv_a_layernorm(latent).unsqueeze(1)  # [B, 1, T, kv_rank]
        k_rot = apply_rotary(deinterleave(k_rot.unsqueeze(1)), cos, sin)  # [B, 1, T, rope], shared by all heads
        q_rot = apply_rotary(deinterleave(q_rot), cos, sin)
        if cache is not None:
            latent, k_rot = cache.update(self.layer_idx, latent, k_rot)

        kv = self.kv_b_proj(latent.squeeze(1)).view(batch, -1, self.num_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split((self.nope, self.v_dim), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, self.num_heads, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_rot), dim=-1)
        pad = self.nope + self.rope - self.v_dim
        if pad > 0 and q.device.type == "cpu" and self.pad_v_for_fused_kernel:
            # The CPU's fused (flash) SDPA kernel needs one head dim for q, k and v; otherwise SDPA falls back
            # to the unfused math path (full [T, T] scores, no causal skipping). Zero columns of v give zero
            # output columns, cut off again below.
            out = _attend(q, k, F.pad(v, (0, pad)), mask, self.scale)[..., : self.v_dim]
        else:
            out = _attend(q, k, v, mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class GroupedQueryAttention(nn.Module):
    """Llama-style attention (rotate-half rope over the whole head, no interleave)."""

    def __init__(self, config: MoSTConfig, layer_idx: int):
        super().__init__()
        c = config
        linear = partial(nn.Linear, bias=False)
        self.layer_idx, self.num_heads = layer_idx, c.num_heads
        self.num_kv_heads = c.num_kv_heads or c.num_heads
        self.head_dim = c.head_dim or c.hidden_size // c.num_heads
        self.q_proj = linear(c.hidden_size, c.num_heads * self.head_dim)
        self.k_proj = linear(c.hidden_size, self.num_kv_heads * self.head_dim)
        self.v_proj = linear(c.hidden_size, self.num_kv_heads * self.head_dim)
        self.o_proj = linear(c.num_heads * self.head_dim, c.hidden_size)
        self.scale = self.head_dim ** -0.5

    def forward(self, hidden, cos, sin, mask=None, cache: KVCache | None = None):
        batch, seq, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = _attend(q, k, v, mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def build_attention(config: MoSTConfig, layer_idx: int) -> nn.Module:
    cls = MultiHeadLatentAttention if config.attention == "mla" else GroupedQueryAttention
    return cls(config, layer_idx)
