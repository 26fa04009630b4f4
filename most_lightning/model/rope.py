"""Rotary position embeddings: plain, YaRN (DeepSeek-V2) and Llama-3 frequency scaling.

``RotaryEmbedding(dim, theta, scaling)(position_ids)`` gives (cos, sin) of shape [B, T, dim] in the
rotate-half layout. DeepSeek checkpoints store the rope dims of q/k as interleaved pairs; ``deinterleave``
brings them to the rotate-half layout first (docs/model_spec.md section 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def attention_softmax_scale(qk_head_dim: int, scaling: dict[str, Any] | None) -> float:
    """1/sqrt(d), times mscale(factor, mscale_all_dim)^2 under YaRN (the factor older releases forgot)."""
    scale = qk_head_dim ** -0.5
    if scaling and scaling.get("type") == "yarn" and scaling.get("mscale_all_dim", 0):
        m = yarn_get_mscale(scaling["factor"], scaling["mscale_all_dim"])
        scale = scale * m * m
    return scale


def _yarn_inv_freq(dim: int, theta: float, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    factor, original = float(s["factor"]), int(s["original_max_position_embeddings"])
    beta_fast, beta_slow = float(s.get("beta_fast", 32)), float(s.get("beta_slow", 1))

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    interpolation = extrapolation / factor
    keep_extrapolated = 1.0 - ramp  # high-frequency dims keep their frequency, low ones are interpolated
    inv_freq = interpolation * (1 - keep_extrapolated) + extrapolation * keep_extrapolated
    # cos/sin get mscale(factor, mscale) / mscale(factor, mscale_all_dim); 1.0 for DeepSeek-V2-Lite.
    magnitude = yarn_get_mscale(factor, s.get("mscale", 1)) / yarn_get_mscale(factor, s.get("mscale_all_dim", 0))
    return inv_freq.float(), magnitude


def _llama3_inv_freq(dim: int, theta: float, s: dict[str, Any]) -> torch.Tensor:
    factor, original = float(s["factor"]), int(s["original_max_position_embeddings"])
    low_ff, high_ff = float(s.get("low_freq_factor", 1)), float(s.get("high_freq_factor", 4))
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen) - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low_ff, inv_freq / factor, inv_freq)
    medium = (wavelen <= original / low_ff) & (wavelen >= original / high_ff)
    return torch.where(medium, smoothed, scaled).float()


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None):
        super().__init__()
        self.magnitude = 1.0
        kind = (scaling or {}).get("type")
        if kind == "yarn":
            inv_freq, self.magnitude = _yarn_inv_freq(dim, theta, scaling)
        elif kind == "llama3":
            inv_freq = _llama3_inv_freq(dim, theta, scaling)
        else:
            inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, dim/2]
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.magnitude).to(dtype), (angles.sin() * self.magnitude).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., (d/2 pairs)] interleaved (x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...)."""
    *lead, dim = x.shape
    return x.view(*lead, dim // 2, 2).transpose(-1, -2).reshape(*lead, dim)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d]; cos/sin [B, T, d]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
