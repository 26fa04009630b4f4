"""Our decoder against transformers' own DeepSeek-V2 and Llama implementations (independent oracles).

The weights of a small random MoST model are copied into the transformers model; logits must agree. This
checks MLA, the YaRN frequencies and mscale^2 softmax factor, the interleaved rope layout, RMSNorm, the
dense first layer, the vanilla gate, the routed and shared experts, and plain GQA attention.
"""

from __future__ import annotations

import math

import pytest
import torch

from most_lightning.model import MoSTConfig, MoSTForCausalLM
from most_lightning.model.hf_compat import to_hf_deepseek_config, to_hf_state_dict

transformers = pytest.importorskip("transformers")

YARN = dict(type="yarn", factor=40.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0,
            mscale=0.707, mscale_all_dim=0.707)


def small_config(**overrides) -> MoSTConfig:
    values = dict(vocab_size=97, hidden_size=64, num_layers=3, num_heads=4, kv_lora_rank=16, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                  n_routed_experts=8, n_shared_experts=2, top_k=3, first_k_dense_replace=1,
                  max_position_embeddings=2560, rope_scaling=YARN, router=dict(name="vanilla"))
    values.update(overrides)
    return MoSTConfig(**values)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("rope_scaling", [YARN, None], ids=["yarn", "plain-rope"])
def test_logits_match_transformers_deepseek_v2(q_lora_rank, rope_scaling):
    torch.manual_seed(0)
    config = small_config(q_lora_rank=q_lora_rank, rope_scaling=rope_scaling)
    ours = MoSTForCausalLM(config).eval()
    for p in ours.parameters():  # larger weights than the 0.02 init so that every path matters
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    theirs = transformers.DeepseekV2ForCausalLM(to_hf_deepseek_config(config, attn_implementation="eager")).eval()
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]

    # Positions beyond the original context exercise the YaRN-interpolated frequencies.
    ids = torch.randint(0, config.vocab_size, (2, 40))
    positions = torch.arange(100, 140).expand(2, -1)
    with torch.no_grad():
        expected = theirs(input_ids=ids, position_ids=positions).logits
        got = ours(ids, position_ids=positions).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_gqa_attention_matches_transformers_llama():
    torch.manual_seed(0)
    scaling = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)
    config = small_config(attention="gqa", num_heads=4, num_kv_heads=2, first_k_dense_replace=3,
                          rope_scaling=scaling, rope_theta=500000.0)
    ours = MoSTForCausalLM(config).eval()
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        tie_word_embeddings=False, attn_implementation="eager")
    theirs = transformers.LlamaForCausalLM(hf_config).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    ids = torch.randint(0, config.vocab_size, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_yarn_softmax_scale_of_deepseek_v2_lite():
    """docs/model_spec.md section 1: 192^-0.5 * mscale^2 with mscale = 0.1 * 0.707 * ln(40) + 1."""
    from most_lightning.model.rope import attention_softmax_scale

    config = MoSTConfig.from_preset("deepseek_v2_lite")
    mscale = 0.1 * 0.707 * math.log(40.0) + 1
    assert attention_softmax_scale(config.qk_head_dim, config.rope_scaling) == pytest.approx(
        192 ** -0.5 * mscale**2, rel=1e-9)
    assert attention_softmax_scale(192, config.rope_scaling) == pytest.approx(0.114721, abs=5e-7)
