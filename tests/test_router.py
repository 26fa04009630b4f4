"""Routers against hand-written gates and hand-computed losses (docs/model_spec.md sections 2.2 and 2.3)."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES
from most_lightning.model import ConfigError, MoSTConfig, RouterConfig, expert_partition
from most_lightning.model.router import ROUTERS, balance_loss, build_router, router_config

E, K, H = 8, 2, 16


def make_router(name="modality_aware", **router_kw):
    config = MoSTConfig.from_preset("tiny", hidden_size=H, n_routed_experts=E, top_k=K,
                                    router=dict(name=name, **router_kw))
    torch.manual_seed(0)
    router = build_router(config)
    torch.nn.init.normal_(router.weight, std=1.0)
    return router.train()


def inputs(batch=3, tokens=10):
    torch.manual_seed(1)
    hidden = torch.randn(batch, tokens, H)
    modality = torch.randint(0, 2, (batch, tokens))
    return hidden, modality


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["vanilla", "modality_aware"])
def test_gate_runs_in_fp32_under_mixed_precision_autocast(name, device):
    """Autocast would compute F.linear in bf16 (3 significant digits): the routing must not change with it."""
    router = make_router(name).to(device)
    hidden, modality = (t.to(device) for t in inputs())
    reference = router(hidden, modality)
    with torch.autocast(device, dtype=torch.bfloat16):
        mixed = router(hidden, modality)
    assert mixed.weights.dtype == torch.float32 and torch.equal(mixed.indices, reference.indices)
    torch.testing.assert_close(mixed.weights, reference.weights, rtol=1e-6, atol=1e-7)


def test_vanilla_equals_hand_written_deepseek_gate():
    router = make_router("vanilla")
    hidden, modality = inputs()
    routing = router(hidden, modality)
    # DeepSeek-V2 gate, written out: fp32 logits, softmax over all experts, greedy top-k, no renormalisation.
    logits = hidden.reshape(-1, H).double() @ router.weight.double().T
    probs = torch.exp(logits - logits.max(-1, keepdim=True).values)
    probs = probs / probs.sum(-1, keepdim=True)
    for n in range(probs.shape[0]):
        order = sorted(range(E), key=lambda e: -probs[n, e].item())[:K]
        assert set(routing.indices[n].tolist()) == set(order)
        for j, e in enumerate(routing.indices[n].tolist()):
            assert routing.weights[n, j].item() == pytest.approx(probs[n, e].item(), rel=1e-5)


def test_modality_aware_stays_in_group_with_masked_softmax_weights():
    router = make_router("modality_aware")
    hidden, modality = inputs(batch=4, tokens=50)
    routing = router(hidden, modality)
    text, audio = set(range(E // 2)), set(range(E // 2, E))  # reference index split, text first
    probs = torch.softmax(hidden.reshape(-1, H) @ router.weight.T, dim=-1)  # over ALL experts
    for n, m in enumerate(modality.reshape(-1).tolist()):
        group = audio if m else text
        chosen = routing.indices[n].tolist()
        assert set(chosen) <= group
        in_group = sorted(group, key=lambda e: -probs[n, e].item())[:K]
        assert set(chosen) == set(in_group)
        torch.testing.assert_close(routing.weights[n], probs[n, chosen])  # raw probabilities, not renormalised
    assert (routing.weights.sum(-1) < 1).all()


def test_logit_masking_and_renormalisation_switches():
    hidden, modality = inputs()
    group_mask = expert_partition(E, 0.5, K).group_mask()[modality.reshape(-1)]
    logits_router = make_router("modality_aware", mask="logits")
    routing = logits_router(hidden, modality)
    logits = hidden.reshape(-1, H) @ logits_router.weight.T
    in_group = torch.softmax(logits.masked_fill(~group_mask, float("-inf")), dim=-1)
    torch.testing.assert_close(routing.weights, in_group.gather(1, routing.indices))

    renorm = make_router("modality_aware", renormalize=True)(hidden, modality)
    torch.testing.assert_close(renorm.weights.sum(-1), torch.ones(hidden.shape[0] * hidden.shape[1]))


def test_balance_loss_matches_hand_computation():
    torch.manual_seed(3)
    batch, tokens = 2, 5
    scores = torch.rand(batch, tokens, E)
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(batch * tokens)]).view(batch, tokens, K)
    expected = 0.0
    for b in range(batch):
        for i in range(E):
            count = sum(int(i in indices[b, t].tolist()) for t in range(tokens))
            f = count / (tokens * K / E)
            p = sum(scores[b, t, i].item() for t in range(tokens)) / tokens
            expected += f * p
    expected /= batch
    assert balance_loss(scores, indices, E, K).item() == pytest.approx(expected, rel=1e-6)


def test_router_aux_losses_are_weighted_and_use_masked_scores():
    router = make_router("modality_aware", balance_loss_alpha=0.25, z_loss_coef=0.5)
    hidden, modality = inputs()
    routing = router(hidden, modality)
    logits = hidden.reshape(-1, H) @ router.weight.T
    group_mask = expert_partition(E, 0.5, K).group_mask()[modality.reshape(-1)]
    masked = torch.softmax(logits, -1).masked_fill(~group_mask, 0.0)
    expected_balance = 0.25 * balance_loss(masked.view(3, 10, E), routing.indices.view(3, 10, K), E, K)
    torch.testing.assert_close(routing.aux_losses["balance"], expected_balance)
    torch.testing.assert_close(routing.aux_losses["z"], 0.5 * torch.logsumexp(logits, -1).pow(2).mean())
    assert make_router("vanilla", balance_loss_alpha=0.0)(hidden, modality).aux_losses == {}
    assert router.eval()(hidden, modality).aux_losses == {}  # aux losses are a training signal only


def test_router_stats_fraction_of_each_modality():
    router = make_router("modality_aware")
    hidden, modality = inputs()
    stats = router(hidden, modality).stats
    flat_mod, idx = modality.reshape(-1), router(hidden, modality).indices
    for m in (0, 1):
        n_tokens = int((flat_mod == m).sum())
        assert stats.tokens[m] == n_tokens
        for e in range(E):
            count = int(((idx == e).any(-1) & (flat_mod == m)).sum())
            assert stats.load[m, e].item() == pytest.approx(count / n_tokens)
    torch.testing.assert_close(stats.load.sum(-1), torch.full((2,), float(K)))
    assert stats.load[0, E // 2:].sum() == 0 and stats.load[1, : E // 2].sum() == 0


@pytest.mark.parametrize("fraction,n_audio", [(0.5, 32), (0.25, 16), (0.75, 48), (6 / 64, 6), (58 / 64, 58)])
def test_partition_index_split(fraction, n_audio):
    part = expert_partition(64, fraction, 6)
    assert part.audio == tuple(range(64 - n_audio, 64)) and part.text == tuple(range(64 - n_audio))


@pytest.mark.parametrize("fraction", [0.05, 0.95, 0.0, 1.0, -0.1])
def test_impossible_split_is_rejected_at_startup(fraction):
    with pytest.raises(ConfigError, match="audio_expert_fraction"):
        MoSTConfig.from_preset("deepseek_v2_lite", audio_expert_fraction=fraction)


def test_bad_router_settings_name_the_field():
    with pytest.raises(ConfigError, match=r"router 'topk_magic' is not a known router.*modality_aware.*vanilla"):
        router_config({"name": "topk_magic"})
    with pytest.raises(ConfigError, match="router.mask"):
        router_config({"name": "modality_aware", "mask": "weights"})
    with pytest.raises(ConfigError, match="top_k=9 is larger than model.n_routed_experts=8"):
        MoSTConfig.from_preset("tiny", n_routed_experts=8, top_k=9)
    assert {"vanilla", "modality_aware", "aux_free", "modality_aware_aux_free"} <= set(ROUTERS)


def test_router_stats_leave_masked_tokens_out():
    """routing_stats against a count by hand, with padding masked out (no boolean indexing inside: no host sync)."""
    from most_lightning.model.router import routing_stats

    g = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(10)]).view(2, 5, 2)
    modality = torch.randint(0, 2, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    stats = routing_stats(indices, modality, 6, mask)
    counts, tokens = torch.zeros(2, 6), torch.zeros(2)
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                tokens[modality[b, t]] += 1
                for e in indices[b, t]:
                    counts[modality[b, t], e] += 1
    torch.testing.assert_close(stats.tokens, tokens)
    torch.testing.assert_close(stats.load, counts / tokens.clamp(min=1)[:, None])
