"""oneDNN matmuls (model/gemm.py): values and gradients against float64 torch, the fallbacks, and a whole
training step that matches the torch backend."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import most_lightning.model.gemm as gemm
from most_lightning.lit.losses import fused_token_losses
from most_lightning.model import MoSTConfig, MoSTForCausalLM
from most_lightning.model.config import ConfigError
from most_lightning.model.gemm import (Linear, bucket_rows, gather_rows, linear, matmul_nn, matmul_nn_sum, matmul_nt,
                                      matmul_tn, pad_rows, uses_onednn)


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the oneDNN products (every one goes through gemm._nt)."""
    calls = []
    real = gemm._nt

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(gemm, "_nt", counting)
    return calls


def max_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return float((value.detach().double() - exact).abs().max() / exact.abs().max())


def test_this_torch_build_has_the_onednn_path():
    # The pinned torch wheels ship oneDNN; without it every model silently ran the slower path.
    assert uses_onednn("onednn", torch.zeros(2, 2))


@pytest.mark.parametrize("name", ["nt", "nn", "tn"])
def test_matmuls_match_float64_at_fp32_accuracy(name, onednn_calls):
    g = torch.Generator().manual_seed(0)
    a64, b64 = torch.randn(300, 70, generator=g, dtype=torch.float64), torch.randn(300, 90, generator=g,
                                                                                      dtype=torch.float64)
    w64 = torch.randn(90, 70, generator=g, dtype=torch.float64)
    cases = {"nt": (matmul_nt, a64, w64, a64 @ w64.T),
             "nn": (matmul_nn, b64, w64, b64 @ w64),
             "tn": (matmul_tn, a64, b64, a64.T @ b64)}
    fn, left, right, exact = cases[name]
    ours = fn(left.float(), right.float(), "onednn")
    torch_fp32 = fn(left.float(), right.float(), "torch")
    assert onednn_calls == [1]
    assert ours.shape == exact.shape
    # Full fp32 accuracy: a bf16 or tf32 product would be ~1e-3 off, fp32 ~1e-7.
    assert max_error(ours, exact) < 1e-5
    assert max_error(ours, exact) < 10 * max_error(torch_fp32, exact) + 1e-7


@pytest.mark.parametrize("backend", ["onednn", "torch"])
def test_matmul_nn_sum_is_the_sum_of_two_products(backend, onednn_calls):
    """The experts' input gradient g_a @ W_gate + g_b @ W_up (torch accumulates the second inside its GEMM)."""
    g = torch.Generator().manual_seed(2)
    a1, a2 = (torch.randn(300, 40, generator=g, dtype=torch.float64) for _ in range(2))
    b1, b2 = (torch.randn(40, 70, generator=g, dtype=torch.float64) for _ in range(2))
    got = matmul_nn_sum(a1.float(), b1.float(), a2.float(), b2.float(), backend)
    assert got.shape == (300, 70) and max_error(got, a1 @ b1 + a2 @ b2) < 1e-5
    assert len(onednn_calls) == (2 if backend == "onednn" else 0)


@pytest.mark.parametrize("backend", ["onednn", "torch"])
def test_products_write_into_rows_of_a_sorted_buffer(backend):
    """The loop experts write each piece's products into rows start:end of one buffer; a left operand padded by
    pad_rows (oneDNN) contributes only its first out.shape[0] rows."""
    g = torch.Generator().manual_seed(3)
    a1, a2 = (torch.randn(37, 40, generator=g, dtype=torch.float64) for _ in range(2))
    b1, b2 = (torch.randn(40, 70, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(70, 40, generator=g, dtype=torch.float64)
    padded1, padded2 = (pad_rows(a.float(), backend) for a in (a1, a2))
    assert padded1.shape[0] == (bucket_rows(37) if backend == "onednn" else 37) and bucket_rows(37) > 37
    buffer = torch.full((3, 37, 70), float("nan"))
    assert matmul_nn_sum(padded1, b1.float(), padded2, b2.float(), backend, out=buffer[1]).data_ptr() == \
        buffer[1].data_ptr()
    assert max_error(buffer[1], a1 @ b1 + a2 @ b2) < 1e-5
    matmul_nt(padded1, w.float(), backend, out=buffer[2])
    assert max_error(buffer[2], a1 @ w.T) < 1e-5
    assert buffer[0].isnan().all()  # nothing written outside out


@pytest.mark.parametrize("backend", ["onednn", "torch"])
@pytest.mark.parametrize("shapes", [(70, 90), (90, 70)], ids=["narrow-left", "narrow-right"])
def test_matmul_tn_writes_into_out(backend, shapes):
    """Weight gradients land in slices of a stacked gradient: out= must get the product (both copy orders)."""
    g = torch.Generator().manual_seed(1)
    a64 = torch.randn(300, shapes[0], generator=g, dtype=torch.float64)
    b64 = torch.randn(300, shapes[1], generator=g, dtype=torch.float64)
    stacked = torch.full((3, *shapes), float("nan"))
    result = matmul_tn(a64.float(), b64.float(), backend, out=stacked[1])
    assert result.data_ptr() == stacked[1].data_ptr()
    assert max_error(stacked[1], a64.T @ b64) < 1e-5
    assert stacked[0].isnan().all() and stacked[2].isnan().all()  # the neighbours are untouched


@pytest.mark.parametrize("bias", [False, True])
def test_linear_values_and_gradients_match_float64(bias, onednn_calls):
    g = torch.Generator().manual_seed(2)
    x64 = torch.randn(3, 40, 24, generator=g, dtype=torch.float64)
    w64 = torch.randn(36, 24, generator=g, dtype=torch.float64)
    b64 = torch.randn(36, generator=g, dtype=torch.float64) if bias else None
    grad = torch.randn(3, 40, 36, generator=g, dtype=torch.float64)
    leaves = [t.float().requires_grad_() if t is not None else None for t in (x64, w64, b64)]
    out = linear(leaves[0][:, ::2], leaves[1], leaves[2])  # a non-contiguous input is fine too
    out.backward(grad[:, ::2].float())
    exact_sub = [t.clone().detach().requires_grad_() if t is not None else None for t in (x64, w64, b64)]
    F.linear(exact_sub[0][:, ::2], *exact_sub[1:]).backward(grad[:, ::2])
    assert len(onednn_calls) == 3  # forward, d input, d weight
    assert max_error(out, F.linear(x64[:, ::2], w64, b64)) < 1e-5
    for ours, reference in zip(leaves, exact_sub):
        if ours is not None:
            assert ours.grad.shape == reference.shape and ours.grad.is_contiguous()
            assert max_error(ours.grad, reference.grad) < 1e-5


def test_linear_skips_gradients_nobody_needs(onednn_calls):
    x = torch.randn(16, 8)  # no grad: only d weight is computed
    weight = torch.randn(4, 8, requires_grad=True)
    linear(x, weight).sum().backward()
    assert len(onednn_calls) == 2
    torch.testing.assert_close(weight.grad, torch.ones(16, 4).T @ x)


@pytest.mark.parametrize("case", ["torch backend", "bf16", "autocast", "empty", "meta", "float64"])
def test_falls_back_to_torch_where_onednn_does_not_apply(case, onednn_calls):
    x, weight, backend = torch.randn(8, 6), torch.randn(5, 6), "onednn"
    if case == "torch backend":
        backend = "torch"
    elif case in ("bf16", "float64"):
        dtype = torch.bfloat16 if case == "bf16" else torch.float64
        x, weight = x.to(dtype), weight.to(dtype)
    elif case == "empty":
        x = x[:0]
    elif case == "meta":
        x, weight = x.to("meta"), weight.to("meta")
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = linear(x, weight, backend=backend)
        assert out.dtype == torch.bfloat16  # autocast still applies, as for nn.Linear
    else:
        out = linear(x, weight, backend=backend)
        assert out.shape == (x.shape[0], 5) and out.dtype == x.dtype
        if case != "meta":
            torch.testing.assert_close(out, F.linear(x, weight))
    assert onednn_calls == []


def test_linear_module_is_a_drop_in_nn_linear():
    plain = nn.Linear(6, 4)
    ours = Linear(6, 4)
    assert isinstance(ours, nn.Linear) and list(ours.state_dict()) == list(plain.state_dict())
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(5, 6)
    torch.testing.assert_close(ours(x), plain(x))
    assert "backend=onednn" in repr(ours)
    with pytest.raises(ValueError, match=r"cpu_matmul='mkl': allowed values are \['auto', 'onednn', 'torch'\]"):
        Linear(6, 4, backend="mkl")


def test_config_rejects_an_unknown_backend():
    with pytest.raises(ConfigError, match=r"model.cpu_matmul='mkl': allowed values are \['auto', 'onednn', 'torch'\]"):
        MoSTConfig.from_preset("tiny", cpu_matmul="mkl")


def training_grads(model: MoSTForCausalLM, ids, labels, modality):
    model.zero_grad(set_to_none=True)
    out = model(ids, modality, compute_logits=False)
    loss = fused_token_losses(out.hidden, model.lm_head.weight, labels, modality,
                              backend=model.config.cpu_matmul).mean() + out.aux_loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_training_step_with_onednn_matches_the_torch_backend(onednn_calls):
    torch.manual_seed(0)
    config = MoSTConfig.from_preset("tiny", vocab_size=512, num_layers=2, router=dict(name="modality_aware"),
                                    cpu_matmul="onednn")
    reference = MoSTForCausalLM(config.replace(cpu_matmul="torch"))
    ours = MoSTForCausalLM(config)
    ours.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 512, (2, 48))
    modality = (torch.arange(48) >= 20).long().expand(2, -1)
    labels = ids.clone()
    labels[:, :10] = -100
    expected_loss, expected = training_grads(reference, ids, labels, modality)
    assert onednn_calls == []
    loss, grads = training_grads(ours, ids, labels, modality)
    assert len(onednn_calls) > 30  # attention, dense and shared MLPs, every expert, LM head: fwd and bwd
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bucket_rows_pads_by_at_most_an_eighth_with_few_sizes():
    assert [bucket_rows(n) for n in (1, 7, 32, 33, 48, 49, 1037, 2048, 2049)] == [1, 7, 32, 48, 48, 64, 1152, 2048,
                                                                                2304]
    assert len({bucket_rows(n) for n in range(1025, 2049)}) == 8  # eight shapes per power of two
    assert all(n <= bucket_rows(n) <= n + max(15, n / 8) for n in range(1, 5000))


def test_gather_and_pad_rows_append_zero_rows_only_for_onednn():
    x, index = torch.randn(50, 3), torch.tensor([4, 0, 4, 49] * 10)
    gathered = gather_rows(x, index)
    assert gathered.shape == (bucket_rows(40), 3) == (48, 3)
    torch.testing.assert_close(gathered[:40], x[index], rtol=0, atol=0)
    assert torch.all(gathered[40:] == 0)
    padded = pad_rows(x[:40])
    assert padded.shape == (48, 3) and torch.equal(padded[:40], x[:40]) and torch.all(padded[40:] == 0)
    assert gather_rows(x, index, "torch").shape == (40, 3)
    assert pad_rows(x[:40], "torch").shape == (40, 3)
