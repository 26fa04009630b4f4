"""One validated configuration for a MoST model (backbone + MoE + router).

Every field is a plain value so Hydra can set it; bad combinations fail in ``__post_init__`` with a message
naming the field and the values that are allowed.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A model or router setting that cannot work; the message names the field and the fix."""


@dataclass
class RouterConfig:
    """The settings every router has. A router class extends it with its own fields (``Router.Config``);
    ``router_config`` in model/router.py builds the right one from a Hydra node or a dict."""

    # The router: a registered name (@register_router) or the dotted path of a Router class (a node's _target_).
    name: str = "modality_aware"
    # Reference balance loss weight (docs/model_spec.md section 2.3); 0 disables it.
    balance_loss_alpha: float = 0.001
    # Optional router z-loss weight (mean squared logsumexp of the gate logits); the reference has none.
    z_loss_coef: float = 0.0
    # Renormalise the chosen top-k weights to sum to one (the reference does not).
    renormalize: bool = False
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        for name in ("balance_loss_alpha", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"router.{name}={getattr(self, name)} must be >= 0 (0 disables it)")


@dataclass
class MoSTConfig:
    """DeepSeek-V2-style decoder with modality-aware MoE feed-forward layers."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    num_layers: int = 27
    num_heads: int = 16
    # "mla": DeepSeek multi-head latent attention; "gqa": plain multi-head / grouped-query attention (Llama).
    attention: str = "mla"
    num_kv_heads: int | None = None  # gqa only; None = num_heads
    head_dim: int | None = None  # gqa only; None = hidden_size // num_heads
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    # None, or a dict with "type": "yarn" | "llama3" and that type's fields (see most_lightning.model.rope).
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    intermediate_size: int = 10944  # dense FFN width (first_k_dense_replace layers)
    moe_intermediate_size: int = 1408
    n_routed_experts: int = 64
    n_shared_experts: int = 2  # fused into one SwiGLU of width n_shared_experts * moe_intermediate_size
    top_k: int = 6
    first_k_dense_replace: int = 1
    audio_expert_fraction: float = 0.5
    partition: str = "index"
    expert_dispatch: str = "auto"  # "auto" | "grouped_mm" | "loop" (model/experts.py: choose_dispatch)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # a RouterConfig (or subclass), or a mapping with the router's name / _target_ and its fields
    router: Any = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        from most_lightning.model.router import router_config  # lazy: the router module imports this one

        self.router = router_config(self.router)
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        from most_lightning.model.experts import DISPATCHES
        from most_lightning.model.partition import PARTITIONS, expert_partition
        from most_lightning.model.router import router_class

        positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "moe_intermediate_size",
                    "n_routed_experts", "top_k", "max_position_embeddings"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be a positive integer")
        if self.attention not in ("mla", "gqa"):
            raise ConfigError(f"model.attention={self.attention!r}: allowed values are 'mla' and 'gqa'")
        if self.attention == "gqa":
            kv = self.num_kv_heads or self.num_heads
            if self.num_heads % kv:
                raise ConfigError(f"model.num_heads={self.num_heads} must be a multiple of num_kv_heads={kv}")
            if self.head_dim is None and self.hidden_size % self.num_heads:
                raise ConfigError("model.hidden_size must be divisible by num_heads, or set model.head_dim")
        elif self.qk_rope_head_dim % 2:
            raise ConfigError(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if not 0 <= self.first_k_dense_replace <= self.num_layers:
            raise ConfigError(
                f"model.first_k_dense_replace={self.first_k_dense_replace} must lie in [0, num_layers={self.num_layers}]"
            )
        if self.top_k > self.n_routed_experts:
            raise ConfigError(
                f"model.top_k={self.top_k} is larger than model.n_routed_experts={self.n_routed_experts}; "
                "lower top_k or add experts"
            )
        if self.n_shared_experts < 0:
            raise ConfigError(f"model.n_shared_experts={self.n_shared_experts} must be >= 0 (0 = no shared experts)")
        if self.expert_dispatch not in DISPATCHES:
            raise ConfigError(f"model.expert_dispatch={self.expert_dispatch!r}: allowed values are {list(DISPATCHES)}")
        if self.expert_dispatch == "grouped_mm" and self.has_moe:
            misaligned = [f"{name}={getattr(self, name)}" for name in ("hidden_size", "moe_intermediate_size")
                          if getattr(self, name) % 8]
            if misaligned:  # 16-byte rows in bf16/fp16, which grouped_mm's kernels need
                raise ConfigError(f"model.expert_dispatch=grouped_mm needs widths that are multiples of 8, not "
                                  f"{', '.join(misaligned)}; use expert_dispatch=auto or loop")
        if self.partition not in PARTITIONS:
            raise ConfigError(f"model.partition={self.partition!r}: allowed values are {sorted(PARTITIONS)}")
        if self.rope_scaling is not None and self.rope_scaling.get("type") not in ("yarn", "llama3"):
            raise ConfigError(
                f"model.rope_scaling.type={self.rope_scaling.get('type')!r}: allowed values are 'yarn' and 'llama3'"
            )
        if router_class(self.router.name).uses_partition and self.has_moe:
            expert_partition(self.n_routed_experts, self.audio_expert_fraction, self.top_k, self.partition)

    # ------------------------------------------------------------------ derived values
    @property
    def has_moe(self) -> bool:
        return self.first_k_dense_replace < self.num_layers

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def shared_intermediate_size(self) -> int:
        return self.n_shared_experts * self.moe_intermediate_size

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    def replace(self, **changes: Any) -> "MoSTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # router: its name (or class path) and all its fields

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MoSTConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        values = {**PRESETS[name], **overrides}
        return cls(**values)


# Fields older versions stored in configs and checkpoints, and why they are ignored now.
RETIRED_FIELDS = {
    "cpu_matmul": "the CPU matmul backend choice is gone (plain torch matmuls on every device)",
}


# Router fields that every router's config carried, at their default, before routers owned their configs
# (checkpoints of that time store them): name -> (that default, why). A router class without the field drops
# it at that value with a notice; any other value was set by hand and is refused as an unknown field.
RETIRED_ROUTER_FIELDS = {
    "mask": ("probs", "only modality-aware routers have it; configs of every router stored it before routers "
                      "owned their configs"),
}


_noticed: set[tuple[str, str]] = set()


def without_retired_fields(values: dict[str, Any], source: str = "a saved config") -> dict[str, Any]:
    """``values`` without RETIRED_FIELDS, each dropped with a one-line notice naming ``source`` (once per
    source and field: loading reads a checkpoint's config more than once)."""
    kept = dict(values)
    for name, why in RETIRED_FIELDS.items():
        if name in kept:
            value = kept.pop(name)
            if (source, name) not in _noticed:
                _noticed.add((source, name))
                log.warning("%s: ignoring model.%s=%r: %s", source, name, value, why)
    return kept


# DeepSeek-V2-Lite as published (docs/model_spec.md section 1): 15,706,484,224 parameters.
DEEPSEEK_V2_LITE: dict[str, Any] = dict(
    vocab_size=102400, hidden_size=2048, num_layers=27, num_heads=16, attention="mla", q_lora_rank=None,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0,
    rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                      beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
    max_position_embeddings=163840, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64,
    n_shared_experts=2, top_k=6, first_k_dense_replace=1, rms_norm_eps=1e-6, tie_word_embeddings=False,
)

# Same architecture family at laptop scale: trains in minutes on two CPU cores.
TINY: dict[str, Any] = dict(
    vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, attention="mla", q_lora_rank=None,
    kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, rope_theta=10000.0,
    rope_scaling=None, max_position_embeddings=2048, intermediate_size=768, moe_intermediate_size=128,
    n_routed_experts=8, n_shared_experts=1, top_k=2, first_k_dense_replace=1, rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

# Llama-3.2-3B (GQA 24/8 heads, head_dim 128, llama3 rope, tied embeddings) upcycled to MoE (the MoST paper's
# dense-backbone ablation): every FFN (8192) cut in two segments of 4096: the first is the shared expert, the
# 8 routed experts are copies of the second, top-2. Exactly the dense model at init when the top-k weights sum to
# one (router.renormalize=true); see most_lightning/model/checkpoint/upcycle.py.
LLAMA3_2_3B_UPCYCLED: dict[str, Any] = dict(
    vocab_size=128256, hidden_size=3072, num_layers=28, num_heads=24, attention="gqa", num_kv_heads=8, head_dim=128,
    rope_theta=500000.0, rope_scaling=dict(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192),
    max_position_embeddings=131072, intermediate_size=8192, moe_intermediate_size=4096, n_routed_experts=8,
    n_shared_experts=1, top_k=2, first_k_dense_replace=0, rms_norm_eps=1e-5, tie_word_embeddings=True,
)

# The default run's model: TINY at width 128 with plain multi-head attention (head_dim 32), which two CPU cores
# train to listen on the default demo corpus in ~3 minutes (docs/learning_check.md, "The default run").
DEMO: dict[str, Any] = dict(TINY, hidden_size=128, attention="gqa", intermediate_size=384, moe_intermediate_size=64)

PRESETS: dict[str, dict[str, Any]] = {"tiny": TINY, "demo": DEMO, "deepseek_v2_lite": DEEPSEEK_V2_LITE,
                                      "llama3_2_3b_upcycled": LLAMA3_2_3B_UPCYCLED}
