"""Checkpoints across versions and precisions: a stored ``cpu_matmul`` key (a retired host setting) is ignored
with a one-line notice; an fp32 checkpoint trains under bf16 autocast and matches fp32 to bf16 tolerance."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from most_lightning.marks import IGNORE_INDEX
from most_lightning.model import MoSTConfig, MoSTForCausalLM
from most_lightning.model.checkpoint import export_hf, load_pretrained

SMALL = dict(vocab_size=97, hidden_size=64, num_layers=3, num_heads=4, kv_lora_rank=16, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
             n_shared_experts=1, top_k=2, first_k_dense_replace=1, max_position_embeddings=256,
             router=dict(name="modality_aware"))


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch):
    """The notice comes once per source and process; these tests each want to see it."""
    monkeypatch.setattr("most_lightning.model.config._noticed", set())


def retired_notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "cpu_matmul" in r.getMessage()]


def test_exported_checkpoint_with_a_cpu_matmul_key_loads_with_one_notice(tmp_path, caplog):
    torch.manual_seed(0)
    model = MoSTForCausalLM(MoSTConfig(**SMALL))
    export_hf(model, tmp_path / "out")
    config_file = tmp_path / "out" / "config.json"
    config = json.loads(config_file.read_text())
    config["most"]["cpu_matmul"] = "onednn"  # what every export of the older versions stored
    config_file.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        back, _ = load_pretrained(tmp_path / "out", progress=False)
    assert back.config == model.config
    notices = retired_notices(caplog)
    assert len(notices) == 1 and "ignoring model.cpu_matmul='onednn'" in notices[0], notices
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_lightning_checkpoint_with_a_cpu_matmul_key_loads_with_one_notice(tmp_path, caplog):
    from most_lightning.lit import MoSTLitModule

    model_group = dict(preset="tiny", hidden_size=64, num_heads=2, intermediate_size=96, moe_intermediate_size=32,
                       kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_layers=2)
    module = MoSTLitModule(model=model_group, router=dict(name="vanilla"), vocab_size=101)
    hparams = dict(module.hparams)
    hparams["model"] = {**hparams["model"], "cpu_matmul": "auto"}  # the key older runs saved in their hparams
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": "2.6.0"}, ckpt)
    with caplog.at_level(logging.WARNING):
        back = MoSTLitModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert back.model.config == module.model.config
    assert len(retired_notices(caplog)) == 1
    for key, value in module.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def batch(seed: int = 0, rows: int = 2, seq: int = 24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMALL["vocab_size"], (rows, seq), generator=g)
    modality = torch.zeros_like(ids)
    modality[:, seq // 2:] = 1
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    return ids, modality, labels


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_fp32_checkpoint_trains_under_bf16_autocast_and_matches_fp32(tmp_path):
    torch.manual_seed(0)
    export_hf(MoSTForCausalLM(MoSTConfig(**SMALL)), tmp_path / "fp32")
    model, _ = load_pretrained(tmp_path / "fp32", progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids, modality, labels = batch()
    model.eval()
    with torch.no_grad():
        full = model(ids, modality).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(ids, modality).logits
    assert mixed.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: a relative error of a few 2^-8 per layer, on logits of this model's scale.
    scale = full.abs().max()
    torch.testing.assert_close(mixed.float(), full, rtol=0.0, atol=0.05 * scale.item())
    assert (mixed.float().argmax(-1) == full.argmax(-1)).float().mean() > 0.9

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, modality, labels=labels, compute_logits=False).loss
        loss.backward()
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0], losses  # it learns the (memorised) batch
