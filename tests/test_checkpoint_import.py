"""DeepSeek-V2 import against transformers' DeepseekV2ForCausalLM, expert layouts on import, and bad checkpoints."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hf_checkpoints import deepseek_model, llama_model, save_hf
from most_lightning.model.checkpoint import (
    CheckpointError,
    import_weights,
    load_pretrained,
    load_routing_stats,
    measure_routing_stats,
    pretrained_config,
    save_routing_stats,
)

transformers = pytest.importorskip("transformers")


def logits_pair(theirs, ours, vocab, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 40), generator=gen)
    positions = torch.arange(100, 140).expand(2, -1)  # beyond the original context: YaRN-interpolated frequencies
    with torch.no_grad():
        return theirs(input_ids=ids, position_ids=positions).logits, ours.eval()(ids, position_ids=positions).logits


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_import_matches_transformers_logits(tmp_path, single_thread, layout, q_lora_rank):
    theirs = deepseek_model(q_lora_rank=q_lora_rank)
    path = save_hf(theirs, tmp_path / "ckpt", layout)
    with open(path / "model.safetensors", "rb") as f:  # the layout really is the one named
        assert (b"gate_up_proj" in f.read(100_000)) == (layout == "fused")
    ours, report = load_pretrained(path, progress=False)
    assert ours.config.q_lora_rank == q_lora_rank and ours.config.router.name == "vanilla"
    assert report.initialised_by_rule == {} and report.ignored == []
    expected, got = logits_pair(theirs, ours, 97)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_with_index_and_original_config_format(tmp_path, single_thread):
    """Shards + model.safetensors.index.json written by transformers; config.json rewritten in the original
    DeepSeek format (rope_theta + rope_scaling with "type"); tied embeddings (no lm_head key)."""
    theirs = deepseek_model(tie_word_embeddings=True)
    path = save_hf(theirs, tmp_path / "ckpt", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 3
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    (path / "config.json").write_text(json.dumps(config))
    ours, _ = load_pretrained(path, progress=False)
    assert ours.config.tie_word_embeddings and ours.config.rope_scaling["type"] == "yarn"
    expected, got = logits_pair(theirs, ours, 97)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_modality_aware_text_routing_follows_the_reference_rule(tmp_path, single_thread):
    """All-text input, router=modality_aware: per MoE layer, softmax over ALL experts, audio-group probabilities
    zeroed, greedy top-k, raw probabilities as weights; experts and shared experts computed by transformers."""
    theirs = deepseek_model()
    ours, _ = load_pretrained(save_hf(theirs, tmp_path / "ckpt"), router=dict(name="modality_aware"), progress=False)
    ours.eval()
    text_group = list(range(4))  # index split of 8 experts at fraction 0.5
    captured = {}
    for i in (1, 2):
        ours.model.layers[i].mlp.register_forward_hook(
            lambda mod, args, out, i=i: captured.__setitem__(i, (args[0].detach(), out[0].detach(), out[1])))
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours(ids, torch.zeros_like(ids))
        for i, (h, out, routing) in captured.items():
            flat = h.reshape(-1, h.shape[-1])
            ref_mlp = theirs.model.layers[i].mlp
            scores = torch.softmax(flat.float() @ ref_mlp.gate.weight.float().T, dim=-1)
            scores[:, 4:] = 0.0
            weights, indices = torch.topk(scores, 3, dim=-1)
            assert set(indices.unique().tolist()) <= set(text_group)
            torch.testing.assert_close(routing.indices.sort(-1).values, indices.sort(-1).values, atol=0, rtol=0)
            expected = ref_mlp.experts(flat, indices, weights) + ref_mlp.shared_experts(flat)
            torch.testing.assert_close(out.reshape(-1, out.shape[-1]), expected, atol=1e-5, rtol=1e-5)
            assert float(weights.sum(-1).max()) < 1.0  # not renormalised, as in the reference


# ------------------------------------------------------------------------------------------ expert layouts
def test_copy_layout_doubles_the_experts_and_keeps_pretrained_routing(tmp_path, single_thread):
    theirs = deepseek_model()
    path = save_hf(theirs, tmp_path / "ckpt")
    base, _ = load_pretrained(path, progress=False)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 30), generator=gen)
    modality = torch.randint(0, 2, (2, 30), generator=gen)
    with torch.no_grad():
        expected = base.eval()(ids, modality).logits
    # in-group softmax over exact copies: each modality routes exactly as the pretrained vanilla model
    copied, _ = load_pretrained(path, layout="copy", router=dict(name="modality_aware", mask="logits"), progress=False)
    assert copied.config.n_routed_experts == 16
    experts = copied.model.layers[1].mlp.experts
    ref = base.model.layers[1].mlp.experts
    assert torch.equal(experts.gate_proj[:8], ref.gate_proj) and torch.equal(experts.gate_proj[8:], ref.gate_proj)
    assert torch.equal(copied.model.layers[2].mlp.gate.weight[11], base.model.layers[2].mlp.gate.weight[3])
    with torch.no_grad():
        torch.testing.assert_close(copied.eval()(ids, modality).logits, expected, atol=1e-5, rtol=1e-5)
    # the reference probability mask halves every weight (each probability is shared with its copy): x2 undoes it
    scaled, _ = load_pretrained(path, layout="copy", progress=False,
                                router=dict(name="modality_aware", routed_scaling_factor=2.0))
    with torch.no_grad():
        torch.testing.assert_close(scaled.eval()(ids, modality).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="audio_expert_fraction 0.5"):
        load_pretrained(path, layout="copy", audio_expert_fraction=0.375, router=dict(name="modality_aware"),
                        progress=False)


def test_by_routing_stats_layout_puts_audio_preferred_experts_in_the_audio_group(tmp_path, single_thread):
    theirs = deepseek_model()
    path = save_hf(theirs, tmp_path / "ckpt")
    # layer 1: audio prefers experts 1, 6, 3, 4 (audio - text: .5, .4, .3, .2); layer 2: the index split as is
    text = torch.full((8,), 0.1)
    audio1 = torch.tensor([0.0, 0.6, 0.05, 0.4, 0.3, 0.0, 0.5, 0.1])
    stats = {1: torch.stack([text, audio1]), 2: torch.stack([text, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1.0])])}
    save_routing_stats(stats, tmp_path / "stats.safetensors")
    assert torch.equal(load_routing_stats(tmp_path / "stats.safetensors")[1], stats[1])
    ours, _ = load_pretrained(path, layout="by_routing_stats", routing_stats=tmp_path / "stats.safetensors",
                              router=dict(name="modality_aware"), progress=False)
    base, _ = load_pretrained(path, progress=False)
    expected_sources = {1: [0, 2, 5, 7, 1, 3, 4, 6], 2: list(range(8))}
    for layer, sources in expected_sources.items():
        got, ref = ours.model.layers[layer].mlp, base.model.layers[layer].mlp
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(got.experts, name), getattr(ref.experts, name)[sources])
        assert torch.equal(got.gate.weight, ref.gate.weight[sources])
    # a permutation: under vanilla routing the model computes the same function
    vanilla, _ = load_pretrained(path, layout="by_routing_stats", routing_stats=stats, progress=False)
    expected, got = logits_pair(theirs, vanilla, 97)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(CheckpointError, match="needs init.routing_stats"):
        load_pretrained(path, layout="by_routing_stats", progress=False)


def test_measured_routing_stats_count_tokens_per_modality(tmp_path, single_thread):
    ours, _ = load_pretrained(save_hf(deepseek_model(), tmp_path / "ckpt"), progress=False)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    modality = torch.zeros_like(ids)
    modality[:, 6:] = 1
    stats = measure_routing_stats(ours, [{"input_ids": ids, "modality": modality}])
    with torch.no_grad():
        routing = ours(ids, modality).router_stats[0]
    assert sorted(stats) == [1, 2]
    torch.testing.assert_close(stats[1], routing.load)  # one batch: the layer's own load fractions
    torch.testing.assert_close(stats[2].sum(-1), torch.tensor([3.0, 3.0]))  # each token picks top_k = 3


# ------------------------------------------------------------------------------------------ bad checkpoints
@pytest.fixture
def sharded(tmp_path):
    return save_hf(deepseek_model(), tmp_path / "ckpt", max_shard_size="40KB")


def test_missing_shard_is_named(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}.*missing"):
        load_pretrained(sharded, progress=False)


def test_truncated_file_is_named_with_its_key(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{victim.name}: truncated: tensor '.+' needs bytes"):
        load_pretrained(sharded, progress=False)
    victim.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_pretrained(sharded, progress=False)


def test_config_of_another_architecture(tmp_path, sharded):
    llama = llama_model()
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(CheckpointError, match="config.json: a dense Llama checkpoint is not a MoE.*upcycle_from"):
        load_pretrained(tmp_path / "llama", progress=False)
    config = json.loads((sharded / "config.json").read_text())
    (sharded / "config.json").write_text(json.dumps({**config, "model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match="model_type='bert'"):
        load_pretrained(sharded, progress=False)
    (sharded / "config.json").write_text(json.dumps({**config, "scoring_func": "sigmoid"}))
    with pytest.raises(CheckpointError, match="scoring_func='sigmoid'"):
        load_pretrained(sharded, progress=False)
    del config["kv_lora_rank"]
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="required field 'kv_lora_rank'"):
        load_pretrained(sharded, progress=False)


def test_missing_unexpected_and_misshapen_keys_are_all_named_before_loading(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_hf(deepseek_model(), tmp_path / "ckpt")
    state = load_file(path / "model.safetensors")
    del state["model.layers.2.mlp.experts.5.up_proj.weight"]
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(3)
    state["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 60)
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path, progress=False)
    message = str(err.value)
    assert "missing from the checkpoint (1): model.layers.2.mlp.experts.5.up_proj.weight" in message
    assert "unexpected in the checkpoint, not used by the model (1): model.layers.1.mlp.extra.weight" in message
    assert "model.layers.0.self_attn.o_proj.weight in model.safetensors: checkpoint [64, 60], model needs [64, 64]" in message


def test_nothing_is_left_at_random_init(tmp_path):
    """Every model tensor is written by the import: an empty model filled with NaN comes out NaN-free."""
    path = save_hf(deepseek_model(), tmp_path / "ckpt")
    from most_lightning.model.checkpoint import empty_model

    model = empty_model(pretrained_config(path))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    report = import_weights(model, path, progress=False)
    assert report.loaded == 83
    assert not any(torch.isnan(p).any() for p in model.parameters())


def test_import_into_a_model_of_another_architecture_is_refused(tmp_path):
    from most_lightning.model import MoSTForCausalLM

    path = save_hf(deepseek_model(), tmp_path / "ckpt")
    model = MoSTForCausalLM(pretrained_config(path).replace(kv_lora_rank=8))
    with pytest.raises(CheckpointError, match="kv_lora_rank: model 8, checkpoint 16"):
        import_weights(model, path, progress=False)


def test_group_limited_routing_is_announced(tmp_path, caplog):
    path = save_hf(deepseek_model(), tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "topk_method": "group_limited_greedy"}))
    with caplog.at_level(logging.WARNING):
        pretrained_config(path)
    assert "group_limited_greedy" in caplog.text


def test_plain_reads_and_memory_mapping_give_the_same_tensors(tmp_path):
    from safetensors.torch import load_file

    from most_lightning.model.checkpoint import CheckpointDir

    path = save_hf(deepseek_model(), tmp_path / "ckpt", max_shard_size="40KB")
    ckpt = CheckpointDir(path)
    read = dict(ckpt.tensors(reader="read"))
    mapped = dict(ckpt.tensors(reader="mmap"))
    reference = {k: v for f in ckpt.files for k, v in load_file(f).items()}
    assert read.keys() == mapped.keys() == reference.keys()
    assert all(torch.equal(read[k], reference[k]) and torch.equal(mapped[k], reference[k]) for k in reference)
    bf16 = {"w": torch.randn(3, 5).to(torch.bfloat16), "e": torch.zeros(0, 4)}
    from safetensors.torch import save_file

    (tmp_path / "bf16").mkdir()
    (tmp_path / "bf16" / "config.json").write_text("{}")
    save_file(bf16, tmp_path / "bf16" / "model.safetensors")
    got = dict(CheckpointDir(tmp_path / "bf16").tensors())
    assert torch.equal(got["w"], bf16["w"]) and got["e"].shape == (0, 4)
