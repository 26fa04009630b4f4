"""GroupedExperts: both dispatch paths against a naive per-token reference, the dispatch decision for every
(device, autocast, dtype) case, the dense SwiGLU by hand."""

import pytest
import torch
import torch.nn.functional as F

from most_lightning.model.experts import (DispatchError, GroupedExperts, SwiGLU, choose_dispatch,
                                          grouped_mm_unavailable, sort_by_expert)

HIDDEN, INTER, N_EXPERTS = 16, 12, 6


def naive_experts(x, indices, weights, gate, up, down):
    """y[n] = sum_j w[n, j] * SwiGLU_{e[n, j]}(x[n]), token by token."""
    rows = []
    for n in range(x.shape[0]):
        row = torch.zeros_like(x[n])
        for j in range(indices.shape[1]):
            e = int(indices[n, j])
            row = row + weights[n, j] * (F.silu(gate[e] @ x[n]) * (up[e] @ x[n])) @ down[e].T
        rows.append(row)
    return torch.stack(rows)


def routing(n_tokens, top_k, n_used, seed=0):
    """Distinct experts per token, drawn from the first ``n_used`` experts only (the rest get no token)."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(n_used, generator=g)[:top_k] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, top_k, generator=g)
    return indices, weights


def run(dispatch, params, x, indices, weights, grad_out, dtype=torch.float32):
    experts = GroupedExperts(HIDDEN, INTER, N_EXPERTS, dispatch=dispatch).to(dtype)
    experts.load_state_dict(params)
    x = x.to(dtype).clone().requires_grad_()
    weights = weights.to(dtype).clone().requires_grad_()
    out = experts(x, indices, weights)
    out.backward(grad_out.to(dtype))
    return [out, x.grad, weights.grad, experts.gate_proj.grad, experts.up_proj.grad, experts.down_proj.grad]


def run_naive(params, x, indices, weights, grad_out):
    leaves = [t.clone().requires_grad_() for t in (x, weights, params["gate_proj"], params["up_proj"],
                                                   params["down_proj"])]
    out = naive_experts(leaves[0], indices, *leaves[1:])
    out.backward(grad_out)
    return [out] + [t.grad for t in leaves]


NAMES = ["output", "grad x", "grad weights", "grad gate_proj", "grad up_proj", "grad down_proj"]


@pytest.mark.parametrize("top_k,n_used", [(2, N_EXPERTS), (3, N_EXPERTS - 2), (1, N_EXPERTS - 1)],
                         ids=["k2-all-used", "k3-two-idle", "k1-one-idle"])
def test_dispatch_paths_match_naive_reference(top_k, n_used):
    torch.manual_seed(0)
    params = GroupedExperts(HIDDEN, INTER, N_EXPERTS).state_dict()
    x, grad_out = torch.randn(29, HIDDEN), torch.randn(29, HIDDEN)
    indices, weights = routing(29, top_k, n_used)
    expected = run_naive(params, x, indices, weights, grad_out)
    for dispatch in ("loop", "grouped_mm"):
        got = run(dispatch, params, x, indices, weights, grad_out)
        for name, g, e in zip(NAMES, got, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{dispatch} {name}: {m}")
    # Idle experts get a gradient, and it is zero (DDP requires every parameter to receive one).
    for grad in got[3:]:
        assert grad is not None and torch.all(grad[n_used:] == 0)


def loop_case(n_tokens):
    """(loop experts, x, indices, weights, grad_out, naive reference results) for n_tokens top-2 tokens."""
    torch.manual_seed(0)
    params = GroupedExperts(HIDDEN, INTER, N_EXPERTS).state_dict()
    x, grad_out = torch.randn(n_tokens, HIDDEN), torch.randn(n_tokens, HIDDEN)
    indices, weights = routing(n_tokens, 2, N_EXPERTS)
    expected = run_naive(params, x, indices, weights, grad_out)
    experts = GroupedExperts(HIDDEN, INTER, N_EXPERTS, dispatch="loop")
    experts.load_state_dict(params)
    return experts, x, indices, weights, grad_out, expected


def test_loop_passes_gradcheck():
    """The oracle path in fp64 against finite differences, an idle expert included (grouped_mm has no fp64)."""
    torch.manual_seed(0)
    experts = GroupedExperts(6, 4, 4, dispatch="loop").double()
    indices, weights = routing(5, 2, 3)  # expert 3 gets no token
    x = torch.randn(5, 6, dtype=torch.double, requires_grad=True)
    weights = weights.double().requires_grad_()

    def call(x, weights, gate, up, down):
        experts.stacked_weights = lambda: (gate, up, down)  # the parameters as gradcheck's inputs
        return experts(x, indices, weights)

    params = [p.detach().clone().requires_grad_() for p in (experts.gate_proj, experts.up_proj, experts.down_proj)]
    assert torch.autograd.gradcheck(call, (x, weights, *params))


@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm"])
def test_sum_backward_and_frozen_inputs(dispatch):
    """.sum().backward() hands a stride-0 gradient (grouped_mm's backward rejects those); inputs that need no
    gradient and no_grad inference must work too."""
    torch.manual_seed(0)
    experts = GroupedExperts(HIDDEN, INTER, N_EXPERTS, dispatch=dispatch)
    indices, weights = routing(9, 2, N_EXPERTS)
    x = torch.randn(9, HIDDEN)
    experts(x, indices, weights).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in experts.parameters())
    with torch.no_grad():
        out = experts(x, indices, weights)
    torch.testing.assert_close(out, naive_experts(x, indices, weights, *experts.stacked_weights()).detach(),
                               rtol=1e-4, atol=1e-5)


def test_bfloat16_loop_close_to_float32():
    torch.manual_seed(0)
    params = GroupedExperts(HIDDEN, INTER, N_EXPERTS).state_dict()
    x, grad_out = torch.randn(21, HIDDEN), torch.randn(21, HIDDEN)
    indices, weights = routing(21, 2, N_EXPERTS)
    full = run("loop", params, x, indices, weights, grad_out)
    half = run("loop", params, x, indices, weights, grad_out, dtype=torch.bfloat16)
    for name, h, f in zip(NAMES, half, full):
        assert h.dtype == torch.bfloat16
        torch.testing.assert_close(h.float(), f, rtol=0.05, atol=0.05, msg=lambda m: f"{name}: {m}")


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
ALIGNED, MISALIGNED = (2048, 1408), (2048, 1404)  # 1404 * 2 bytes is not a multiple of 16


# (device type, capability, autocast dtype or None, input dtype, widths) -> what "auto" picks.
AUTO_CASES = [
    # The bf16-mixed training case: fp32 input and weights, autocast bf16 -> the grouped kernel.
    ("cuda", (9, 0), BF16, FP32, ALIGNED, "grouped_mm"),
    ("cuda", (8, 0), BF16, FP32, ALIGNED, "grouped_mm"),
    ("cuda", (9, 0), FP16, FP32, ALIGNED, "grouped_mm"),
    ("cuda", (9, 0), None, BF16, ALIGNED, "grouped_mm"),  # pure bf16 model
    ("cuda", (9, 0), None, FP16, ALIGNED, "grouped_mm"),
    ("cuda", (9, 0), None, FP32, ALIGNED, "loop"),  # fp32 compute: no grouped kernel
    ("cuda", (9, 0), BF16, FP32, MISALIGNED, "loop"),
    ("cuda", (7, 5), BF16, FP32, ALIGNED, "loop"),  # pre-Ampere
    ("cuda", (7, 5), None, FP16, ALIGNED, "loop"),
    ("cpu", None, None, FP32, ALIGNED, "loop"),  # the CPU default: the oracle path
    ("cpu", None, BF16, FP32, ALIGNED, "loop"),
    ("cpu", None, None, BF16, ALIGNED, "loop"),
    ("mps", None, None, FP32, ALIGNED, "loop"),
]


@pytest.mark.parametrize("device,capability,autocast,dtype,widths,expected", AUTO_CASES)
def test_auto_dispatch_follows_the_compute_dtype(device, capability, autocast, dtype, widths, expected):
    assert choose_dispatch("auto", device, capability, autocast, dtype, widths) == expected
    assert choose_dispatch("loop", device, capability, autocast, dtype, widths) == "loop"  # the oracle, always


@pytest.mark.parametrize("device,capability,autocast,dtype,widths,reason", [
    ("cuda", (7, 5), BF16, FP32, ALIGNED, "compute capability >= 8.0"),
    ("cuda", (9, 0), BF16, FP32, MISALIGNED, "multiple of 16 bytes"),
    ("cpu", None, None, FP32, (16, 6), "multiple of 16 bytes"),  # 6 * 4 bytes
    ("mps", None, None, FP32, ALIGNED, "'mps'"),
    ("cpu", None, None, torch.float64, ALIGNED, "fp32/bf16/fp16"),
])
def test_grouped_mm_where_it_cannot_run_names_the_reason(device, capability, autocast, dtype, widths, reason):
    with pytest.raises(DispatchError, match=reason):
        choose_dispatch("grouped_mm", device, capability, autocast, dtype, widths)


def test_grouped_mm_dispatch_where_it_can_run():
    assert choose_dispatch("grouped_mm", "cuda", (9, 0), BF16, FP32, ALIGNED) == "grouped_mm"
    assert choose_dispatch("grouped_mm", "cuda", (8, 0), None, FP32, ALIGNED) == "grouped_mm"  # asked for: fp32 too
    assert choose_dispatch("grouped_mm", "cpu", None, None, FP32, ALIGNED) == "grouped_mm"
    assert choose_dispatch("grouped_mm", "cpu", None, BF16, FP32, ALIGNED) == "grouped_mm"
    assert grouped_mm_unavailable("cpu", None, FP32, (16, 12)) is None
    with pytest.raises(DispatchError, match="allowed values"):
        choose_dispatch("einsum", "cpu", None, None, FP32, ALIGNED)


def test_grouped_mm_where_it_cannot_run_fails_at_the_first_call_and_at_config_time():
    from most_lightning.model import ConfigError, MoSTConfig

    experts = GroupedExperts(16, 6, 3, dispatch="grouped_mm")  # 6 fp32 values = 24 bytes per row
    indices, weights = routing(4, 2, 3)
    with pytest.raises(DispatchError, match="multiple of 16 bytes"):
        experts(torch.randn(4, 16), indices, weights)
    with pytest.raises(ConfigError, match="moe_intermediate_size=132"):
        MoSTConfig.from_preset("tiny", moe_intermediate_size=132, expert_dispatch="grouped_mm")


def test_resolved_dispatch_reads_autocast_not_the_input_dtype(monkeypatch):
    """What the module passes to choose_dispatch: autocast's dtype while autocast is on, else the input's."""
    seen = []
    monkeypatch.setattr("most_lightning.model.experts.choose_dispatch",
                        lambda *args: seen.append(args) or "loop")
    experts = GroupedExperts(HIDDEN, 16, N_EXPERTS)
    x = torch.zeros(1, HIDDEN)
    experts.resolved_dispatch(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        experts.resolved_dispatch(x)
    assert seen == [("auto", "cpu", None, None, FP32, (HIDDEN, 16)), ("auto", "cpu", None, BF16, FP32, (HIDDEN, 16))]


def test_auto_dispatch_and_validation():
    experts = GroupedExperts(HIDDEN, INTER, N_EXPERTS)
    assert experts.resolved_dispatch(torch.zeros(1, HIDDEN)) == "loop"
    with pytest.raises(ValueError, match="dispatch"):
        GroupedExperts(HIDDEN, INTER, N_EXPERTS, dispatch="einsum")
    with pytest.raises(ValueError, match="expert_indices"):
        experts(torch.zeros(3, HIDDEN), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 1))


def test_layout_and_init():
    experts = GroupedExperts(64, 32, 4)
    gate, up, down = experts.stacked_weights()
    assert gate.shape == up.shape == (4, 32, 64) and down.shape == (4, 64, 32)
    assert gate.abs().max() <= 64 ** -0.5 and down.abs().max() <= 32 ** -0.5  # nn.Linear's bound 1/sqrt(fan_in)
    experts.reset_parameters(std=0.02)
    assert all(abs(p.std().item() - 0.02) < 0.002 for p in experts.parameters())


def test_dense_swiglu_by_hand():
    torch.manual_seed(0)
    mlp = SwiGLU(HIDDEN, INTER)
    x = torch.randn(5, HIDDEN)
    a = x @ mlp.gate_proj.weight.T
    expected = (a / (1 + torch.exp(-a)) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), expected)
    assert all(m.bias is None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))


@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm"])
def test_autocast_bfloat16_keeps_float32_weights(dispatch):
    torch.manual_seed(0)
    experts = GroupedExperts(HIDDEN, 16, N_EXPERTS, dispatch=dispatch)  # bf16 grouped_mm: 16-byte strides
    indices, weights = routing(9, 2, N_EXPERTS)
    x = torch.randn(9, HIDDEN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, indices, weights)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in experts.parameters())
    expected = naive_experts(x.detach(), indices, weights, *experts.stacked_weights()).detach()
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    with pytest.raises(TypeError, match="autocast"):
        experts(x.detach().bfloat16(), indices, weights)


def test_frozen_experts_still_pass_gradients_to_inputs():
    experts, x, indices, weights, grad_out, expected = loop_case(11)
    experts.requires_grad_(False)
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    experts(x, indices, weights).backward(grad_out)
    torch.testing.assert_close(x.grad, expected[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights.grad, expected[2], rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in experts.parameters())


def test_sort_by_expert_groups_the_slots_stably_and_counts_them():
    indices = torch.tensor([[2, 0], [1, 2], [2, 1], [0, 3]])
    order, token_index, counts = sort_by_expert(indices, 5)
    assert order.tolist() == [1, 6, 2, 5, 0, 3, 4, 7]  # expert 0: slots 1, 6; expert 1: 2, 5; 2: 0, 3, 4; 3: 7
    assert token_index.tolist() == [0, 3, 1, 2, 0, 1, 2, 3]
    assert counts.tolist() == torch.bincount(indices.flatten(), minlength=5).tolist() == [2, 2, 3, 1, 0]
