"""Our model in transformers' DeepSeek-V2 terms: the config and the state-dict layout.

Used as the parity oracle in tests and benchmarks (and the seed of the HF export). transformers is only
needed when ``to_hf_deepseek_config`` is called.
"""

from __future__ import annotations

import torch

from most_lightning.model.config import MoSTConfig


def to_hf_deepseek_config(c: MoSTConfig, **extra):
    """A transformers ``DeepseekV2Config`` with the same architecture numbers (vanilla routing semantics)."""
    from transformers import DeepseekV2Config

    if c.attention != "mla":
        raise ValueError(f"transformers' DeepSeek-V2 needs MLA attention; this config uses {c.attention!r}")
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling:
        if c.rope_scaling.get("type") != "yarn":
            raise ValueError(f"only YaRN rope scaling maps onto DeepSeek-V2, not {c.rope_scaling.get('type')!r}")
        rope = {"rope_type": "yarn", "rope_theta": c.rope_theta,
                **{k: v for k, v in c.rope_scaling.items() if k != "type"}}
    return DeepseekV2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_heads, n_shared_experts=c.n_shared_experts,
        n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.top_k,
        first_k_dense_replace=c.first_k_dense_replace, kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
        rope_parameters=rope, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        norm_topk_prob=False, topk_method="greedy", routed_scaling_factor=c.router.routed_scaling_factor,
        tie_word_embeddings=c.tie_word_embeddings, **extra,
    )


def to_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our weights in transformers' key layout: stacked experts -> fused ``gate_up_proj`` (gate over up)."""
    state = {}
    for key, value in model.state_dict().items():
        if ".mlp.experts." in key:
            prefix = key.split(".mlp.experts.")[0] + ".mlp.experts"
            gate, up, down = model.get_submodule(prefix).stacked_weights()
            state[prefix + ".gate_up_proj"] = torch.cat((gate, up), dim=1).detach().clone()
            state[prefix + ".down_proj"] = down.detach().clone()
        else:
            state[key] = value.detach().clone()
    return state
