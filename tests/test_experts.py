"""GroupedExperts: both dispatch paths against a naive per-token reference; the dense SwiGLU by hand."""

import contextlib
import threading

import pytest
import torch
import torch.nn.functional as F

import most_lightning.model.experts as experts_module
from most_lightning.model.experts import GroupedExperts, SwiGLU, _LoopSwiGLUExperts, sort_by_expert, sorted_positions

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


def run(dispatch, params, x, indices, weights, grad_out, dtype=torch.float32, cpu_matmul="auto"):
    experts = GroupedExperts(HIDDEN, INTER, N_EXPERTS, dispatch=dispatch, cpu_matmul=cpu_matmul).to(dtype)
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


@contextlib.contextmanager
def expert_worker_threads(n: int):
    """Let the loop path split even these tiny inputs over ``n`` CPU threads (1: run serially)."""
    previous_threads, previous_macs = torch.get_num_threads(), experts_module.MIN_MACS_PER_WORKER
    torch.set_num_threads(n)
    experts_module.MIN_MACS_PER_WORKER = 1
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        experts_module.MIN_MACS_PER_WORKER = previous_macs


NAMES = ["output", "grad x", "grad weights", "grad gate_proj", "grad up_proj", "grad down_proj"]


# Both CPU matmul backends, whichever cpu_matmul=auto picks on this host.
CPU_MATMULS = ["onednn", "torch"]


@pytest.mark.parametrize("cpu_matmul", CPU_MATMULS)
@pytest.mark.parametrize("top_k,n_used", [(2, N_EXPERTS), (3, N_EXPERTS - 2), (1, N_EXPERTS - 1)],
                         ids=["k2-all-used", "k3-two-idle", "k1-one-idle"])
def test_dispatch_paths_match_naive_reference(top_k, n_used, cpu_matmul):
    torch.manual_seed(0)
    params = GroupedExperts(HIDDEN, INTER, N_EXPERTS).state_dict()
    x, grad_out = torch.randn(29, HIDDEN), torch.randn(29, HIDDEN)
    indices, weights = routing(29, top_k, n_used)
    expected = run_naive(params, x, indices, weights, grad_out)
    for dispatch in ("loop", "loop-threads", "grouped_mm"):
        with expert_worker_threads(3 if dispatch == "loop-threads" else 1):
            got = run(dispatch.removesuffix("-threads"), params, x, indices, weights, grad_out, cpu_matmul=cpu_matmul)
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


def test_loop_backward_keeps_the_forward_split_when_the_thread_count_changes():
    experts, x, indices, weights, grad_out, expected = loop_case(29)
    x = x.clone().requires_grad_()
    with expert_worker_threads(3):
        out = experts(x, indices, weights)  # rows cut into three pieces
    with expert_worker_threads(1):
        out.backward(grad_out)  # one thread now: the backward must still walk the forward's pieces
    torch.testing.assert_close(x.grad, expected[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(experts.gate_proj.grad, expected[3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_shared", [False, True], ids=["routed", "routed+shared"])
def test_loop_backward_passes_gradcheck(with_shared, threads):
    torch.manual_seed(0)
    experts = GroupedExperts(6, 4, 4, dispatch="loop").double()
    shared = SwiGLU(6, 8).double()
    indices, weights = routing(5, 2, 3)  # expert 3 gets no token
    x = torch.randn(5, 6, dtype=torch.double, requires_grad=True)
    weights = weights.double().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in experts.stacked_weights()]
    if with_shared:
        params += [m.weight.detach().clone().requires_grad_() for m in (shared.gate_proj, shared.up_proj,
                                                                           shared.down_proj)]
    order, token_index, counts = sort_by_expert(indices, 4)
    with expert_worker_threads(threads):
        plan = experts_module._plan(counts.tolist(), 5, 6 * 4, 6 * 8 if with_shared else 0, x.device)
    assert len(plan) == threads

    def loop_experts(x, weights, gate, up, down, *shared_weights):
        sorted_weights = weights.reshape(-1).index_select(0, order)
        positions = sorted_positions(order, 2, shared=with_shared)
        return _LoopSwiGLUExperts.apply(x, token_index, positions, sorted_weights, plan, gate, up, down,
                                        *(shared_weights or (None, None, None)), "torch")

    with expert_worker_threads(threads):
        assert torch.autograd.gradcheck(loop_experts, (x, weights, *params))


@pytest.mark.parametrize("cpu_matmul", CPU_MATMULS)
@pytest.mark.parametrize("dispatch", ["loop", "loop-threads", "grouped_mm"])
def test_shared_expert_passed_to_the_experts_adds_its_output(dispatch, cpu_matmul):
    """experts(x, ..., shared=mlp) == experts(x, ...) + mlp(x), gradients included: the loop runs the shared
    expert as one more unit of work; the reference is the per-token naive sum plus the dense SwiGLU's own
    autograd."""
    torch.manual_seed(0)
    experts = GroupedExperts(HIDDEN, INTER, N_EXPERTS, dispatch=dispatch.removesuffix("-threads"),
                             cpu_matmul=cpu_matmul)
    shared, reference_shared = SwiGLU(HIDDEN, 2 * INTER, cpu_matmul), SwiGLU(HIDDEN, 2 * INTER, cpu_matmul="torch")
    reference_shared.load_state_dict(shared.state_dict())
    x, grad_out = torch.randn(23, HIDDEN), torch.randn(23, HIDDEN)
    indices, weights = routing(23, 2, N_EXPERTS)
    routed = run_naive(experts.state_dict(), x, indices, weights, grad_out)
    leaf = x.clone().requires_grad_()
    reference_shared(leaf).backward(grad_out)

    ours, ours_weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    with expert_worker_threads(3 if dispatch == "loop-threads" else 1):
        out = experts(ours, indices, ours_weights, shared=shared)
        out.backward(grad_out)
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, routed[0] + reference_shared(x), **close)
    torch.testing.assert_close(ours.grad, routed[1] + leaf.grad, **close)
    torch.testing.assert_close(ours_weights.grad, routed[2], **close)
    for got, expected in zip(experts.stacked_weights(), routed[3:]):
        torch.testing.assert_close(got.grad, expected, **close)
    for name in ("gate_proj", "up_proj", "down_proj"):
        torch.testing.assert_close(getattr(shared, name).weight.grad, getattr(reference_shared, name).weight.grad,
                                   **close)


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


def test_worker_threads_leave_thread_settings_alone():
    """The loop path runs its CPU workers with one intra-op thread each and must restore every setting."""
    torch.manual_seed(0)
    experts = GroupedExperts(HIDDEN, INTER, N_EXPERTS, dispatch="loop")
    indices, weights = routing(40, 2, N_EXPERTS)
    x = torch.randn(40, HIDDEN, requires_grad=True)
    with expert_worker_threads(2):
        experts(x, indices, weights).sum().backward()
        assert torch.get_num_threads() == 2
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # a fresh thread
        thread.start(), thread.join()
        assert seen == [2]
    counts = [5, 0, 9, 1, 4]
    parts = experts_module._split_rows(counts, 2)
    assert parts == [[(0, 0, 5), (2, 5, 9)], [(2, 9, 14), (3, 14, 15), (4, 15, 19)]]  # expert 2 is cut in two
