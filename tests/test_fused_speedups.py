"""The training-speed pieces against their plain computations: the fused chunked LM-head loss (values,
gradients, ignored positions, autocast), the training step with and without it, the padded-v fused SDPA path
of MLA attention, and the fused AdamW of build_adamw."""

from __future__ import annotations

import pytest
import torch

from most_lightning.lit.module import build_adamw
from most_lightning.marks import IGNORE_INDEX
from most_lightning.model import MoSTConfig, MoSTForCausalLM
from most_lightning.model.attention import MultiHeadLatentAttention
from most_lightning.model.rope import RotaryEmbedding
from most_lightning.model.token_losses import fused_token_losses, shifted_token_losses


def loss_inputs(seed: int = 0, batch: int = 3, seq: int = 11, hidden: int = 16, vocab: int = 37):
    torch.manual_seed(seed)
    h = torch.randn(batch, seq, hidden, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, -3:] = IGNORE_INDEX  # padding
    labels[2, 5] = IGNORE_INDEX
    modality = torch.randint(0, 2, (batch, seq))
    return h, w, labels, modality


def plain_and_grads(h, w, labels, modality):
    losses = shifted_token_losses(h @ w.T, labels, modality)
    hg, wg = torch.autograd.grad(losses.mean(), (h, w))
    return losses, hg, wg


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 1000])
def test_fused_loss_matches_plain_values_and_gradients(chunk_rows):
    h, w, labels, modality = loss_inputs()
    plain, h_grad, w_grad = plain_and_grads(h, w, labels, modality)
    fused = fused_token_losses(h, w, labels, modality, chunk_rows=chunk_rows, want_correct=True)
    # both compute the log-softmax in fp32 (losses are fp32 by contract), hence fp32 tolerances
    torch.testing.assert_close(fused.mean(), plain.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.nll, plain.nll.to(fused.nll.dtype) * plain.valid, rtol=1e-6, atol=1e-6)
    assert torch.equal(fused.valid, plain.valid) and torch.equal(fused.target_modality, plain.target_modality)
    assert torch.equal(fused.correct & fused.valid, plain.correct & plain.valid)
    fh, fw = torch.autograd.grad(fused.mean(), (h, w))
    torch.testing.assert_close(fh, h_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fw, w_grad, rtol=1e-5, atol=1e-7)
    # the last position and positions followed by an ignored label get no gradient at all
    assert fh[:, -1].abs().max() == 0 and fh[0, :3].abs().max() == 0


def test_fused_loss_scales_with_the_incoming_gradient_and_breakdowns_match():
    h, w, labels, modality = loss_inputs(seed=1)
    plain = shifted_token_losses(h @ w.T, labels, modality)
    fused = fused_token_losses(h, w, labels, modality, chunk_rows=5)
    expected = torch.autograd.grad(3.5 * plain.mean() + plain.mean().detach(), (h, w))
    got = torch.autograd.grad(3.5 * fused.mean(), (h, w))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for m in (0, 1):  # the logged per-modality means are exact slices of the same nll
        torch.testing.assert_close(fused.mean(fused.modality_mask(m)), plain.mean(plain.modality_mask(m)).float(),
                                   rtol=1e-6, atol=1e-6)


def test_fused_loss_without_grad_and_with_nothing_supervised():
    h, w, labels, modality = loss_inputs(seed=2)
    with torch.no_grad():
        fused = fused_token_losses(h, w, labels, modality, chunk_rows=3)
    torch.testing.assert_close(fused.mean(), shifted_token_losses(h @ w.T, labels, modality).mean().detach())
    none = torch.full_like(labels, IGNORE_INDEX)
    empty = fused_token_losses(h, w, none, modality)
    assert float(empty.mean().detach()) == 0.0 and int(empty.n_tokens) == 0
    empty.mean().backward()
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_fused_loss_rejects_bad_shapes_and_chunks():
    h, w, labels, modality = loss_inputs()
    with pytest.raises(ValueError, match="must agree"):
        fused_token_losses(h[:, :-1], w, labels, modality)
    with pytest.raises(ValueError, match="chunk_rows=0"):
        fused_token_losses(h, w, labels, modality, chunk_rows=0)


def test_fused_loss_under_bfloat16_autocast_is_close_to_float32():
    h, w, labels, modality = loss_inputs(seed=3)
    h, w = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    plain, h_grad, w_grad = plain_and_grads(h, w, labels, modality)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_token_losses(h, w, labels, modality, chunk_rows=4)
    fh, fw = torch.autograd.grad(fused.mean(), (h, w))
    assert fh.dtype == torch.float32 and fw.dtype == torch.float32  # gradients reach the fp32 leaves
    torch.testing.assert_close(fused.mean(), plain.mean(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fw, w_grad, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(fh, h_grad, rtol=5e-2, atol=5e-3)


def tiny_model(**overrides) -> MoSTForCausalLM:
    torch.manual_seed(0)
    config = MoSTConfig.from_preset("tiny", vocab_size=97, hidden_size=32, num_heads=2, kv_lora_rank=8,
                                    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, intermediate_size=48,
                                    moe_intermediate_size=16, **overrides)
    return MoSTForCausalLM(config).train()


def test_model_without_logits_gives_the_lm_head_input():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 9))
    full = model(ids, torch.zeros_like(ids))
    skipped = model(ids, torch.zeros_like(ids), compute_logits=False)
    assert skipped.logits is None
    torch.testing.assert_close(model.lm_head(skipped.hidden), full.logits)


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_training_step_same_loss_and_gradients_with_and_without_fusion(toy_tokenizer, monkeypatch):
    from test_lit_module import capture_logs, make_batch, make_module

    import most_lightning.model.decoder as decoder

    calls = []
    monkeypatch.setattr(decoder, "fused_token_losses",
                        lambda *a, **kw: calls.append(1) or fused_token_losses(*a, **kw))
    batch = make_batch(toy_tokenizer)
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        module = make_module(toy_tokenizer.vocab_size)
        module.model.fused_loss = fused
        logged = capture_logs(module, monkeypatch)
        loss = module.training_step(batch, 0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), dict(logged), grads))
    assert len(calls) == 1  # the fused run really took the fused path, the plain one did not
    (plain_loss, plain_log, plain_grads), (fused_loss, fused_log, fused_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == fused_grads.keys() and "lm_head.weight" in fused_grads
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for key in ("train/loss", "train/loss_text", "train/loss_audio", "train/loss_task_asr", "train/n_tokens"):
        torch.testing.assert_close(torch.as_tensor(fused_log[key]).float(), torch.as_tensor(plain_log[key]).float(),
                                   rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("with_mask", [False, True])
def test_mla_padded_v_fused_kernel_equals_plain_attention(with_mask):
    torch.manual_seed(0)
    config = MoSTConfig.from_preset("tiny", hidden_size=32, num_heads=2, kv_lora_rank=8, qk_nope_head_dim=8,
                                    qk_rope_head_dim=4, v_head_dim=6)
    attn = MultiHeadLatentAttention(config, 0)
    x = torch.randn(2, 13, 32, requires_grad=True)
    cos, sin = RotaryEmbedding(4)(torch.arange(13).expand(2, -1), x.dtype)
    mask = None
    if with_mask:  # causal and the first key of row 1 is padding
        mask = torch.ones(13, 13, dtype=torch.bool).tril().expand(2, 1, 13, 13).clone()
        mask[1, :, 1:, 0] = False
    results = []
    for pad in (False, True):
        attn.pad_v_for_fused_kernel = pad
        out = attn(x, cos, sin, mask)
        grads = torch.autograd.grad(out.square().sum(), (x, *attn.parameters()))
        results.append((out, grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_build_adamw_is_fused_and_steps_like_plain_adamw():
    models = [tiny_model(), tiny_model()]
    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    fused = build_adamw(models[0], settings)
    assert all(group["fused"] for group in fused.param_groups)
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]  # norms are not decayed
    plain = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                               for g in build_adamw(models[1], settings).param_groups],
                              lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    ids = torch.randint(0, 97, (2, 9))
    for _ in range(3):
        for model, opt in zip(models, (fused, plain)):
            model(ids, torch.zeros_like(ids)).logits.square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
