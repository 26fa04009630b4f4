"""Decoder-level behaviour: sizes, KV-cache generation, padding, and where the modality marks act."""

from __future__ import annotations

import pytest
import torch

from most_lightning.model import MoSTConfig, MoSTForCausalLM


def tiny(**overrides) -> MoSTForCausalLM:
    torch.manual_seed(0)
    config = MoSTConfig.from_preset("tiny", vocab_size=101, hidden_size=64, kv_lora_rank=16, qk_nope_head_dim=16,
                                    qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96,
                                    moe_intermediate_size=32, **overrides)
    model = MoSTForCausalLM(config).eval()
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)  # peaky logits: greedy choices are not near-ties
    return model


def test_deepseek_v2_lite_preset_has_the_published_parameter_count():
    with torch.device("meta"):
        model = MoSTForCausalLM(MoSTConfig.from_preset("deepseek_v2_lite"))
    assert model.num_parameters() == 15_706_484_224


def naive_greedy(model, ids, modality_of, steps, eos_id):
    """Oracle: recompute the whole sequence for every new token (no cache)."""
    out = []
    for _ in range(steps):
        logits = model(ids, modality_of(ids)).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        ids = torch.cat((ids, token), dim=1)
        if token.item() == eos_id:
            break
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_kv_cache_generation_equals_full_recomputation(attention):
    model = tiny(attention=attention, router=dict(name="modality_aware"))
    modality_of = lambda ids: (ids >= 60).long()  # noqa: E731 - any fixed marking rule will do here
    prompt = torch.randint(0, 101, (1, 12))
    expected = naive_greedy(model, prompt, modality_of, steps=15, eos_id=-1)
    got = model.generate(prompt, modality_of(prompt), max_new_tokens=15, eos_id=-1, modality_of=modality_of)
    assert torch.equal(got, expected)


def test_left_padded_batch_generates_like_each_prompt_alone():
    model = tiny()
    modality_of = lambda ids: (ids >= 60).long()  # noqa: E731
    prompts = [torch.randint(1, 101, (n,)) for n in (5, 11, 8)]
    width, pad = max(len(p) for p in prompts), 0
    batch = torch.full((3, width), pad)
    mask = torch.zeros(3, width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):], mask[i, width - len(p):] = p, True
    together = model.generate(batch, modality_of(batch) * mask, mask, max_new_tokens=10, eos_id=-1,
                              modality_of=modality_of)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], modality_of(p[None]), max_new_tokens=10, eos_id=-1, modality_of=modality_of)
        assert torch.equal(together[i], alone[0])


def test_generation_stops_at_eos_and_pads_after_it():
    model = tiny()
    prompt = torch.randint(0, 101, (2, 6))
    free = model.generate(prompt, torch.zeros_like(prompt), max_new_tokens=8, eos_id=-1)
    eos = int(free[0, 2])  # make row 0's third token the end of sequence
    got = model.generate(prompt, torch.zeros_like(prompt), max_new_tokens=8, eos_id=eos, pad_id=-5)
    assert got[0, 2] == eos and (got[0, 3:] == -5).all()
    assert torch.equal(got[0, :3], free[0, :3])


def test_right_padding_does_not_change_real_positions():
    model = tiny()
    ids = torch.randint(0, 101, (1, 9))
    padded = torch.cat((ids, torch.zeros(1, 4, dtype=torch.long)), dim=1)
    mask = torch.cat((torch.ones(1, 9), torch.zeros(1, 4)), dim=1).bool()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, torch.zeros_like(padded), attention_mask=mask).logits[:, :9],
                                   model(ids, torch.zeros_like(ids)).logits)


def test_only_moe_layers_read_modality_marks():
    ids = torch.randint(0, 101, (2, 10))
    text, audio = torch.zeros_like(ids), torch.ones_like(ids)
    with torch.no_grad():
        vanilla = tiny(router=dict(name="vanilla"))
        torch.testing.assert_close(vanilla(ids, text).logits, vanilla(ids, audio).logits)
        aware = tiny(router=dict(name="modality_aware"))
        assert not torch.allclose(aware(ids, text).logits, aware(ids, audio).logits)
        dense = tiny(router=dict(name="modality_aware"), first_k_dense_replace=4)  # no MoE layer at all
        torch.testing.assert_close(dense(ids, text).logits, dense(ids, audio).logits)


def test_outputs_carry_aux_losses_and_per_layer_stats():
    model = tiny(router=dict(name="modality_aware", balance_loss_alpha=0.01, z_loss_coef=0.001)).train()
    ids = torch.randint(0, 101, (2, 10))
    out = model(ids, (ids > 50).long())
    n_moe = model.config.num_layers - model.config.first_k_dense_replace
    assert len(out.router_stats) == n_moe and set(out.aux_losses) == {"balance", "z"}
    torch.testing.assert_close(out.aux_loss, out.aux_losses["balance"] + out.aux_losses["z"])
    out.logits.sum().backward()  # marks and stats never break the graph
    assert model.model.layers[1].mlp.gate.weight.grad is not None


@pytest.mark.parametrize("n_shared", [0, 2])
def test_shared_expert_count_sets_the_fused_width(n_shared):
    model = tiny(n_shared_experts=n_shared)
    mlp = model.model.layers[1].mlp
    if n_shared == 0:
        assert mlp.shared_experts is None
    else:
        assert mlp.shared_experts.gate_proj.weight.shape == (n_shared * 32, 64)


def test_overlong_input_and_mismatched_marks_fail_clearly():
    model = tiny(max_position_embeddings=16)
    with pytest.raises(ValueError, match="exceeds model.max_position_embeddings=16"):
        model(torch.zeros(1, 17, dtype=torch.long), torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="modality marks"):
        model(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
