"""CUDA checks: the fused grouped-GEMM expert path against the loop oracle on the GPU, a bf16 training step of the
whole model, KV-cache generation, and run.py with trainer=gpu (fixed and packed batches). Skipped where no CUDA GPU
is present. Packed rows and the fp32 router gate are checked on the GPU in their own modules (conftest.DEVICES)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST_OVERRIDES, REPO_ROOT
from most_lightning.model import MoSTConfig, MoSTForCausalLM
from most_lightning.model.experts import GroupedExperts
from most_lightning.model.moe import MoELayer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")


def expert_outputs_and_grads(dispatch: str, state: dict, x, indices, weights, grad_out, dtype):
    experts = GroupedExperts(x.shape[1], state["gate_proj"].shape[1], state["gate_proj"].shape[0],
                             dispatch=dispatch).to(CUDA, dtype)
    experts.load_state_dict(state)
    x = x.to(dtype).clone().requires_grad_()
    weights = weights.to(dtype).clone().requires_grad_()
    out = experts(x, indices, weights)
    out.backward(grad_out.to(dtype))
    return [out, x.grad, weights.grad, experts.gate_proj.grad, experts.up_proj.grad, experts.down_proj.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_matches_the_loop_on_the_gpu(dtype):
    torch.manual_seed(0)
    hidden, inter, n_experts, top_k, tokens = 64, 48, 8, 2, 512
    state = {"gate_proj": torch.randn(n_experts, inter, hidden, device=CUDA) * 0.1,
             "up_proj": torch.randn(n_experts, inter, hidden, device=CUDA) * 0.1,
             "down_proj": torch.randn(n_experts, hidden, inter, device=CUDA) * 0.1}
    x = torch.randn(tokens, hidden, device=CUDA)
    # expert 7 gets no token: empty groups must work on the GPU too
    indices = torch.stack([torch.randperm(n_experts - 1, device=CUDA)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, device=CUDA)
    grad_out = torch.randn(tokens, hidden, device=CUDA)
    fused = expert_outputs_and_grads("grouped_mm", state, x, indices, weights, grad_out, dtype)
    loop = expert_outputs_and_grads("loop", state, x, indices, weights, grad_out, dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, a, b in zip(("out", "x", "weights", "gate", "up", "down"), fused, loop):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")
    assert fused[3][n_experts - 1].abs().max() == 0  # the idle expert's gradient stays zero


def test_auto_dispatch_uses_the_fused_kernel_for_bf16_on_the_gpu():
    experts = GroupedExperts(64, 32, 4, dispatch="auto").to(CUDA, torch.bfloat16)
    x = torch.zeros(8, 64, device=CUDA, dtype=torch.bfloat16)
    expected = "grouped_mm" if torch.cuda.get_device_capability() >= (8, 0) else "loop"
    assert experts.resolved_dispatch(x) == expected


def test_bf16_mixed_with_fp32_weights_runs_the_grouped_kernel_without_host_sync(monkeypatch):
    """The real training case (precision bf16-mixed): fp32 weights, fp32 RMSNorm output, autocast bf16. The
    experts must take grouped_mm (3 forward calls per MoE layer), and on Hopper and newer (torch's fused grouped
    kernel; older GPUs run its fallback, which reads the offsets on the host) neither the MoE layer's forward nor
    its backward may wait for the GPU."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("grouped_mm needs compute capability >= 8.0")
    import torch.nn.functional as F

    sync_mode = "error" if torch.cuda.get_device_capability() >= (9, 0) else "default"

    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **kw: calls.append(a[0].dtype) or real(*a, **kw))
    torch.manual_seed(0)
    experts = GroupedExperts(128, 64, 8).to(CUDA)  # fp32 parameters
    x = torch.randn(256, 128, device=CUDA, requires_grad=True)
    indices = torch.stack([torch.randperm(8, device=CUDA)[:2] for _ in range(256)])
    weights = torch.rand(256, 2, device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(sync_mode)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert experts.resolved_dispatch(x) == "grouped_mm"
            out = experts(x, indices, weights)
        out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert calls == [torch.bfloat16] * 3
    assert out.dtype == torch.bfloat16 and experts.gate_proj.grad.dtype == torch.float32

    calls.clear()  # the whole MoE layer (router, experts, shared expert) without a host sync either
    layer = MoELayer(MoSTConfig.from_preset("tiny", hidden_size=64, moe_intermediate_size=32)).to(CUDA)
    hidden = torch.randn(2, 32, 64, device=CUDA, requires_grad=True)
    modality = torch.randint(0, 2, (2, 32), device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(sync_mode)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, routing = layer(hidden, modality)
        (out.float().square().mean() + routing.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert calls == [torch.bfloat16] * 3

    calls.clear()  # the whole model under autocast: every MoE layer takes it
    model = tiny_model()  # hidden 64, experts 32 wide: aligned
    ids = torch.randint(0, 101, (2, 32), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(ids, (ids > 50).long()).logits.float().mean().backward()
    moe_layers = sum(model.config.is_moe_layer(i) for i in range(model.config.num_layers))
    assert calls == [torch.bfloat16] * 3 * moe_layers


def tiny_model(**overrides) -> MoSTForCausalLM:
    torch.manual_seed(0)
    config = MoSTConfig.from_preset("tiny", vocab_size=101, hidden_size=64, kv_lora_rank=16, qk_nope_head_dim=16,
                                    qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96,
                                    moe_intermediate_size=32, **overrides)
    return MoSTForCausalLM(config).to(CUDA)


def test_bf16_autocast_training_steps_learn_and_respect_the_modality_groups():
    model = tiny_model(router=dict(name="modality_aware"))
    ids = torch.randint(0, 101, (4, 64), device=CUDA)
    modality = (ids >= 60).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids[:, :-1], modality[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten())
        (loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses  # memorising one batch
    for stats in out.router_stats:  # tokens of each modality only reach their own group
        text_group, audio_group = model.model.layers[-1].mlp.gate.group_mask.bool()
        assert stats.load[0][~text_group].sum() == 0 and stats.load[1][~audio_group].sum() == 0


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_attention_keeps_off_cudnn_which_plans_every_new_shape(attention):
    """cuDNN's SDPA spends milliseconds of host time on every new shape, and every batch has a new length."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_model(attention=attention)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for length in (37, 53):
            ids = torch.randint(0, 101, (2, length), device=CUDA)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(ids, (ids >= 60).long())
            out.logits.float().sum().backward()
    ops = {event.key for event in prof.key_averages()}
    assert {"aten::_flash_attention_forward", "aten::_efficient_attention_forward"} & ops, sorted(ops)
    assert not [op for op in ops if "cudnn_attention" in op]


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_kv_cache_generation_equals_full_recomputation_on_the_gpu(attention):
    model = tiny_model(attention=attention).eval()
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)  # peaky logits: greedy choices are not near-ties
    modality_of = lambda ids: (ids >= 60).long()  # noqa: E731
    ids = torch.randint(0, 101, (1, 12), device=CUDA)
    expected = []
    with torch.no_grad():
        for _ in range(12):
            token = model(ids, modality_of(ids)).logits[:, -1].argmax(-1, keepdim=True)
            expected.append(token)
            ids = torch.cat((ids, token), dim=1)
    got = model.generate(ids[:, :12], modality_of(ids[:, :12]), max_new_tokens=12, eos_id=-1, modality_of=modality_of)
    assert torch.equal(got, torch.cat(expected, dim=1))


@pytest.mark.slow
@pytest.mark.parametrize("batching", [[], ["data.batching=pack", "data.max_length=512", "data.max_tokens=1024"]],
                         ids=["fixed", "pack"])
def test_run_py_trains_and_tests_on_the_gpu_in_bf16(tmp_path, shared_data_dir, batching):
    # MOST_GPU_DATA_DIR: a tiny corpus built elsewhere (GPU machines may lack flite)
    data_dir = os.environ.get("MOST_GPU_DATA_DIR", str(shared_data_dir))
    cmd = [sys.executable, "run.py", "trainer=gpu", *FAST_OVERRIDES, *batching, f"paths.data_dir={data_dir}",
           f"paths.output_dir={tmp_path / 'run'}", f"paths.log_dir={tmp_path / 'logs'}"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    from test_run import read_metrics

    metrics = read_metrics(tmp_path / "run")
    assert metrics["test/expert_load/audio_to_audio_group"] == pytest.approx(1.0)
