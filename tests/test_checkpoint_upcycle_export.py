"""Dense-to-MoE upcycling against transformers' LlamaForCausalLM, and the HF export round trip."""

from __future__ import annotations

import json

import pytest
import torch

from hf_checkpoints import deepseek_model, llama_model, save_hf
from most_lightning.model import MoSTConfig, MoSTForCausalLM
from most_lightning.model.checkpoint import (
    CheckpointDir,
    CheckpointError,
    export_hf,
    identity_at_init,
    load_pretrained,
    upcycle_pretrained,
)

transformers = pytest.importorskip("transformers")


def llama_logits(theirs, ours, vocab):
    ids = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(20, 68).expand(2, -1)  # beyond original_max_position_embeddings=32: llama3 scaling
    with torch.no_grad():
        return (theirs(input_ids=ids, position_ids=positions).logits,
                ours.eval()(ids, torch.zeros_like(ids), position_ids=positions).logits)


MOE = dict(n_routed_experts=4, top_k=2, first_k_dense_replace=0)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("design", [
    dict(moe_intermediate_size=128, n_shared_experts=0, router=dict(name="vanilla", renormalize=True)),
    # finer experts: FFN cut in 2; shared <- first half, routed <- copies of the second half
    dict(moe_intermediate_size=64, n_shared_experts=1, router=dict(name="modality_aware", renormalize=True)),
    # the reference rule (no renormalisation) with a zero gate: probabilities 1/E, top-k sum k/E, scaling E/k
    dict(moe_intermediate_size=128, n_shared_experts=0, router=dict(name="vanilla", routed_scaling_factor=2.0),
         router_init="zeros"),
], ids=["copies-renorm", "split-shared", "zero-gate-scaled"])
def test_upcycled_copies_reproduce_the_dense_llama(tmp_path, single_thread, tie, design):
    theirs = llama_model(tie_word_embeddings=tie)
    theirs.save_pretrained(tmp_path / "llama")
    ours, report = upcycle_pretrained(tmp_path / "llama", progress=False, **MOE, **design)
    assert ours.config.attention == "gqa" and ours.config.num_kv_heads == 2 and ours.config.tie_word_embeddings == tie
    assert ours.config.rope_scaling["type"] == "llama3"
    assert any("identity with the dense model at init: True" in note for note in report.notes)
    assert all("router gate" in how for how in report.initialised_by_rule.values())
    modality = torch.randint(0, 2, (2, 48), generator=torch.Generator().manual_seed(4))
    expected, got = llama_logits(theirs, ours, 89)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    ids = torch.randint(0, 89, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # any modality marks: both groups hold the same copies
        torch.testing.assert_close(ours(ids, modality).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_upcycling_without_normalised_weights_is_not_the_identity(tmp_path, single_thread):
    theirs = llama_model()
    theirs.save_pretrained(tmp_path / "llama")
    ours, report = upcycle_pretrained(tmp_path / "llama", progress=False, moe_intermediate_size=128, n_shared_experts=0,
                                      router=dict(name="vanilla"), **MOE)
    assert any("identity with the dense model at init: False" in note for note in report.notes)
    expected, got = llama_logits(theirs, ours, 89)
    assert (got - expected).abs().max() > 1e-2
    # finer experts from several segments are not the identity either, whatever the router does
    config = ours.config.replace(moe_intermediate_size=32, n_shared_experts=1,
                                 router=dict(name="vanilla", renormalize=True))
    assert identity_at_init(config, 128, "normal") == (
        False, "routed experts come from 3 different FFN segments: the output depends on which ones each token "
               "picks (set moe_intermediate_size so that one segment remains)")


def test_upcycled_expert_weights_are_the_ffn_segments(tmp_path):
    theirs = llama_model()
    theirs.save_pretrained(tmp_path / "llama")
    ours, _ = upcycle_pretrained(tmp_path / "llama", progress=False, moe_intermediate_size=32, n_shared_experts=2,
                                 n_routed_experts=4, top_k=2, first_k_dense_replace=1)
    dense = theirs.model.layers[1].mlp
    moe = ours.model.layers[1].mlp
    # 4 segments of 32: shared <- segments 0, 1; routed experts <- segments 2, 3, 2, 3
    torch.testing.assert_close(moe.shared_experts.gate_proj.weight, dense.gate_proj.weight[:64], atol=0, rtol=0)
    torch.testing.assert_close(moe.shared_experts.down_proj.weight, dense.down_proj.weight[:, :64], atol=0, rtol=0)
    for m, seg in enumerate([2, 3, 2, 3]):
        rows = slice(32 * seg, 32 * seg + 32)
        assert torch.equal(moe.experts.up_proj[m], dense.up_proj.weight[rows])
        assert torch.equal(moe.experts.down_proj[m], dense.down_proj.weight[:, rows])
    assert torch.equal(ours.model.layers[0].mlp.gate_proj.weight, theirs.model.layers[0].mlp.gate_proj.weight)


def test_upcycling_bad_inputs(tmp_path):
    theirs = llama_model()
    theirs.save_pretrained(tmp_path / "llama")
    with pytest.raises(CheckpointError, match="must divide it"):
        upcycle_pretrained(tmp_path / "llama", moe_intermediate_size=48, n_shared_experts=0, **MOE)
    with pytest.raises(CheckpointError, match=r"needs the MoE design: \['n_routed_experts', 'top_k'"):
        upcycle_pretrained(tmp_path / "llama", moe_intermediate_size=64)
    ds = save_hf(deepseek_model(), tmp_path / "ds")
    with pytest.raises(CheckpointError, match="upcycling needs a dense Llama checkpoint"):
        upcycle_pretrained(ds, moe_intermediate_size=32, n_shared_experts=0, **MOE)


# ------------------------------------------------------------------------------------------ export
def random_most(**overrides) -> MoSTForCausalLM:
    torch.manual_seed(0)
    values = dict(vocab_size=97, hidden_size=64, num_layers=3, num_heads=4, kv_lora_rank=16, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                  n_routed_experts=8, n_shared_experts=2, top_k=3, first_k_dense_replace=1,
                  max_position_embeddings=2560, router=dict(name="modality_aware", mask="logits", renormalize=True),
                  rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=64, beta_fast=32.0,
                                    beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707))
    values.update(overrides)
    model = MoSTForCausalLM(MoSTConfig(**values))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("kind", ["mla-sharded", "mla-fused-bf16", "gqa-tied"])
def test_export_reloads_bit_exactly(tmp_path, kind):
    if kind.startswith("gqa"):
        model = random_most(attention="gqa", num_kv_heads=2, tie_word_embeddings=True, q_lora_rank=None,
                            rope_scaling=dict(type="llama3", factor=8.0, original_max_position_embeddings=32))
    else:
        model = random_most(q_lora_rank=24)
    dtype = torch.bfloat16 if "bf16" in kind else None
    files = export_hf(model, tmp_path / "out", dtype=dtype, expert_layout="fused" if "fused" in kind else "per_expert",
                      max_shard_bytes=60_000 if "sharded" in kind else 2**30)
    assert (len(files) > 1) == ("sharded" in kind) == (tmp_path / "out" / "model.safetensors.index.json").is_file()
    back, report = load_pretrained(tmp_path / "out", progress=False)
    assert back.config == model.config  # router, partition and all: from the "most" entry
    want = {k: v.to(dtype) if dtype else v for k, v in model.state_dict().items()}
    got = back.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key].to(want[key].dtype), want[key]), key
    with pytest.raises(FileExistsError, match="empty directory"):
        export_hf(model, tmp_path / "out")


@pytest.mark.parametrize("n_shared", [2, 0])
def test_exported_vanilla_model_loads_in_transformers_with_the_same_logits(tmp_path, single_thread, n_shared):
    model = random_most(router=dict(name="vanilla"), q_lora_rank=24, n_shared_experts=n_shared).eval()
    export_hf(model, tmp_path / "out", max_shard_bytes=100_000)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v2" and config["rope_scaling"]["type"] == "yarn"
    theirs, info = transformers.DeepseekV2ForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True)
    theirs.eval()
    # a clean load: no "MISSING ... newly initialized" table (n_shared_experts=0 used to miss the shared experts,
    # which transformers builds with width 0)
    assert {k: list(v) for k, v in info.items()} == {"missing_keys": [], "unexpected_keys": [],
                                                      "mismatched_keys": [], "error_msgs": []}
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(100, 140).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, position_ids=positions).logits,
                                   theirs(input_ids=ids, position_ids=positions).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_export_without_shared_experts_writes_empty_ones_and_reloads_exactly(tmp_path, layout):
    model = random_most(n_shared_experts=0, q_lora_rank=24)
    export_hf(model, tmp_path / "out", expert_layout=layout)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        shared = {k: tuple(f.get_tensor(k).shape) for k in f.keys() if ".shared_experts." in k}
    moe_layers = [i for i in range(model.config.num_layers) if model.config.is_moe_layer(i)]
    assert shared == {f"model.layers.{i}.mlp.shared_experts.{p}.weight": shape for i in moe_layers
                      for p, shape in (("gate_proj", (0, 64)), ("up_proj", (0, 64)), ("down_proj", (64, 0)))}
    back, _ = load_pretrained(tmp_path / "out", progress=False)  # our importer skips the empty tensors
    assert back.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_export_cli_from_a_lightning_checkpoint(tmp_path):
    """python -m most_lightning.model.checkpoint export <ckpt> <out>: the model of a Lightning checkpoint."""
    from most_lightning.lit import MoSTLitModule
    from most_lightning.model.checkpoint.__main__ import main

    model_group = dict(preset="tiny", hidden_size=64, num_heads=2, intermediate_size=96, moe_intermediate_size=32,
                       kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_layers=2)
    module = MoSTLitModule(model=model_group, router=dict(name="vanilla"), vocab_size=101)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    back, _ = load_pretrained(tmp_path / "hf", progress=False)
    for key, value in module.model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert CheckpointDir(tmp_path / "hf").config["most"]["router"]["name"] == "vanilla"


def test_inspect_cli_checks_the_plan_from_headers_only(tmp_path, capsys):
    from most_lightning.model.checkpoint.__main__ import main

    path = save_hf(deepseek_model(), tmp_path / "ckpt", max_shard_size="40KB")
    assert main(["inspect", str(path), "--partition", "copy"]) == 0
    out = capsys.readouterr().out
    assert "load plan OK" in out and "16 routed experts" in out
    victim = sorted(path.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    assert main(["inspect", str(path)]) == 2
    assert f"{victim.name}: truncated" in capsys.readouterr().err
