"""Small random HF checkpoints written locally in the real formats (transformers is the writer and the oracle)."""

from __future__ import annotations

from pathlib import Path

import torch

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=64, beta_fast=32.0,
            beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)
LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)


def _large_weights(model: torch.nn.Module, seed: int) -> None:
    """Weights larger than the 0.02 init so that every path matters in a logits comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            else:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


def deepseek_model(seed: int = 0, **overrides):
    import transformers

    values = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8,
                  num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, norm_topk_prob=False, topk_method="greedy",
                  max_position_embeddings=2560, rope_parameters=dict(YARN), tie_word_embeddings=False)
    values.update(overrides)
    config = transformers.DeepseekV2Config(**values, attn_implementation="eager")
    model = transformers.DeepseekV2ForCausalLM(config).eval()
    _large_weights(model, seed)
    return model


def save_hf(model, directory: Path, layout: str = "per_expert", max_shard_size: str | None = None) -> Path:
    """per_expert: transformers' own save_pretrained (experts.{j}.*, as the original DeepSeek repo);
    fused: the in-memory transformers layout (experts.gate_up_proj / down_proj) in one safetensors file."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if layout == "per_expert":
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(directory, **kwargs)
    else:
        model.config.save_pretrained(directory)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def llama_model(seed: int = 0, **overrides):
    import transformers

    values = dict(vocab_size=89, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
                  rope_parameters=dict(LLAMA3), tie_word_embeddings=False)
    values.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**values, attn_implementation="eager")).eval()
    _large_weights(model, seed)
    if values["tie_word_embeddings"]:
        model.tie_weights()
    return model
