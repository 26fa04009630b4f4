"""The model.init contract of the Hydra model group, the Llama-3.2-3B upcycled preset, and run.py training
from a tiny checkpoint written locally."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from conftest import FAST_OVERRIDES, compose_run_config
from hf_checkpoints import deepseek_model, llama_model, save_hf
from most_lightning.model import MoSTForCausalLM
from most_lightning.model.checkpoint import CheckpointError
from most_lightning.model.checkpoint.init import resolve_model_init
from most_lightning.model.config_groups import build_model_config
from most_lightning.text import BaseTokenizerError

transformers = pytest.importorskip("transformers")


def test_llama3_2_3b_upcycled_has_the_real_shapes_on_meta(tmp_path):
    cfg = compose_run_config(["model=llama3_2_3b_upcycled", "router=vanilla"], tmp_path)
    assert cfg.model.init.upcycle_from is None and cfg.model.init.partition == "index"
    config = build_model_config(cfg.model, cfg.router, vocab_size=None)
    with torch.device("meta"):
        ours = MoSTForCausalLM(config)
    llama = transformers.LlamaConfig(  # Llama-3.2-3B's published config.json
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=8192))
    with torch.device("meta"):
        dense = transformers.LlamaForCausalLM(llama)
    n_dense = sum(p.numel() for p in dense.parameters())
    assert n_dense == 3_212_749_824  # Llama-3.2-3B
    # per layer the 2-segment FFN becomes 1 shared + 8 routed segments (+7 segments) and a gate [8, 3072]
    segment = 3 * 3072 * 4096
    assert ours.num_parameters() == n_dense + 28 * (7 * segment + 8 * 3072)
    for name, theirs in dense.named_parameters():
        if ".mlp." not in name:
            assert tuple(ours.get_parameter(name).shape) == tuple(theirs.shape), name


def test_init_node_takes_the_architecture_from_config_json(tmp_path, caplog):
    path = save_hf(deepseek_model(), tmp_path / "ckpt")
    cfg = compose_run_config(["model=deepseek_v2_lite", f"model.init.from_pretrained={path}",
                              "model.audio_expert_fraction=0.375"], tmp_path)
    from omegaconf import OmegaConf

    group = OmegaConf.to_container(cfg.model, resolve=True)
    with caplog.at_level("WARNING"):
        resolved, vocab = resolve_model_init(group, vocab_size=120)
    assert "hidden_size=2048 -> 64" in caplog.text  # the yaml's V2-Lite width is replaced, and said so
    config = build_model_config(resolved, cfg.router, vocab)
    assert (config.hidden_size, config.num_layers, config.n_routed_experts, config.vocab_size) == (64, 3, 8, 120)
    assert config.audio_expert_fraction == 0.375 and config.router.name == "modality_aware"
    assert resolve_model_init(resolved, vocab) == (resolved, vocab)  # resolved once: no config.json needed again
    with pytest.raises(CheckpointError, match="both set"):
        resolve_model_init({"init": {"from_pretrained": str(path), "upcycle_from": str(path)}}, 10)
    with pytest.raises(CheckpointError, match=r"unknown keys \['from_pretrianed'\]"):
        resolve_model_init({"init": {"from_pretrianed": str(path)}}, 10)


def test_lightning_module_upcycles_in_setup_and_keeps_loaded_checkpoints(tmp_path, single_thread):
    from most_lightning.lit import MoSTLitModule

    theirs = llama_model(tie_word_embeddings=True)
    theirs.save_pretrained(tmp_path / "llama")
    cfg = compose_run_config(["model=llama3_2_3b_upcycled", f"model.init.upcycle_from={tmp_path / 'llama'}",
                              "model.moe_intermediate_size=64", "model.n_routed_experts=4",
                              "router=modality_aware_renorm"], tmp_path)
    module = MoSTLitModule(model=cfg.model, router=cfg.router, vocab_size=80)
    assert module.model.config.vocab_size == 89 and module.hparams.model["init"]["_resolved"]
    module.setup("fit")
    ids = torch.randint(0, 89, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(module.model(ids, torch.zeros_like(ids)).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    # a module restored from a Lightning checkpoint never re-imports the pretrained weights over the trained ones
    with torch.no_grad():
        module.model.model.norm.weight.fill_(3.0)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.6"}, ckpt)
    (tmp_path / "llama" / "model.safetensors").unlink()  # the pretrained weights are not needed any more
    restored = MoSTLitModule.load_from_checkpoint(ckpt, weights_only=True)
    restored.setup("test")
    assert torch.equal(restored.model.model.norm.weight, torch.full((64,), 3.0))


@pytest.mark.slow
def test_run_py_trains_from_a_local_deepseek_checkpoint(tmp_path, shared_data_dir, single_thread):
    """python run.py model.init.from_pretrained=<dir>: the base's vocabulary + the corpus's appended tokens."""
    import hydra

    from run import train

    cfg = compose_run_config([*FAST_OVERRIDES, f"paths.data_dir={shared_data_dir}", "test_asr_mismatched=false"],
                             tmp_path)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    tok = datamodule.tokenizer
    base_vocab = tok.vocab_size - tok.n_units - 2  # as if the corpus tokens had been appended to the base
    path = save_hf(deepseek_model(vocab_size=base_vocab), tmp_path / "ckpt")
    with open_dict(cfg):
        cfg.model.init.from_pretrained = str(path)
    metrics = train(cfg)
    assert math.isfinite(metrics["val/nll"]) and math.isfinite(metrics["test/text_nll"])
    saved = json.loads(json.dumps(torch.load(next(Path(cfg.paths.output_dir, "checkpoints").glob("*.ckpt")),
                                             weights_only=True)["hyper_parameters"]["model"]))
    assert saved["hidden_size"] == 64 and saved["num_layers"] == 3 and saved["init"]["_resolved"]

    # the weights training started from are the checkpoint's (plus mean rows for the corpus's own tokens)
    from most_lightning.lit import MoSTLitModule

    module = MoSTLitModule(model=cfg.model, router=cfg.router, vocab_size=tok.vocab_size)
    module.setup("fit")
    emb = module.model.model.embed_tokens.weight
    ckpt_emb = deepseek_model(vocab_size=base_vocab).model.embed_tokens.weight
    assert emb.shape[0] == tok.vocab_size and torch.equal(emb[:base_vocab], ckpt_emb)
    torch.testing.assert_close(emb[base_vocab:], ckpt_emb.mean(0).expand(tok.vocab_size - base_vocab, -1))


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_run_py_fails_fast_on_a_bad_pretrained_dir(tmp_path):
    """Before any corpus is built or Lightning is imported: the culprit named."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    path = save_hf(deepseek_model(), tmp_path / "ckpt", max_shard_size="40KB")
    victim = sorted(path.glob("model-*.safetensors"))[3]
    victim.unlink()
    result = subprocess.run([sys.executable, "run.py", f"model.init.from_pretrained={path}",
                             f"paths.data_dir={tmp_path / 'no_data'}", f"paths.log_dir={tmp_path / 'logs'}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"{victim.name}'] listed in model.safetensors.index.json are missing" in result.stderr
    assert not (tmp_path / "no_data").exists()


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.slow
def test_run_py_tokenises_with_the_checkpoints_extended_tokenizer(tmp_path, shared_data_dir, single_thread):
    """python run.py model.init.from_pretrained=<dir> data.tokenizer.from_base=<dir>: the demo corpus is tokenised
    with the checkpoint's tokenizer.json + appended audio tokens, and the model's vocabulary is that tokenizer's."""
    import hydra
    from tokenizers import Tokenizer

    from most_lightning.data.testing import TINY_RECIPE
    from run import train
    from test_checkpoint_tokenizer import write_base_tokenizer

    base_size = write_base_tokenizer(tmp_path / "ckpt")
    path = save_hf(deepseek_model(vocab_size=base_size), tmp_path / "ckpt")
    cfg = compose_run_config([*FAST_OVERRIDES, f"paths.data_dir={shared_data_dir}", "test_asr_mismatched=false",
                              f"model.init.from_pretrained={path}", f"data.tokenizer.from_base={path}"], tmp_path)
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/nll"])

    n_units = TINY_RECIPE.n_units
    vocab = base_size + 2 + n_units  # begin/end-of-audio, then [Hu0].. appended after the base's ids, in that order
    state = torch.load(next(Path(cfg.paths.output_dir, "checkpoints").glob("*.ckpt")), weights_only=True)
    assert state["hyper_parameters"]["vocab_size"] == vocab
    assert state["state_dict"]["model.model.embed_tokens.weight"].shape[0] == vocab
    assert state["state_dict"]["model.lm_head.weight"].shape[0] == vocab

    dm = hydra.utils.instantiate(cfg.data)
    tok = dm.tokenizer
    assert (tok.vocab_size, tok.boa_id, tok.eoa_id) == (vocab, base_size, base_size + 1)
    assert tok.unit_ids.tolist() == list(range(base_size + 2, vocab))
    assert (tok.bos_id, tok.eos_id) == (0, 1)  # the base's own BOS/EOS (tokenizer_config.json)
    # a TTS example: the transcript as the base tokenizer cuts it, the units at the ids the tokenizer gave them
    record = dm.speech_records("validation", 1)[0][0]
    example = dm.teacher_forced_examples("validation", ("tts",), 1)[0]
    base = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert _contains(example.input_ids, base.encode(record.transcript, add_special_tokens=False).ids)
    assert _contains(example.input_ids, [base_size, *(base_size + 2 + u for u in record.units), base_size + 1])


def test_data_tokenizer_options_fail_naming_the_key_or_the_file(tmp_path, shared_data_dir):
    from most_lightning.data import MoSTDataModule
    from most_lightning.data.testing import TINY_RECIPE, build_tiny_corpus

    with pytest.raises(ValueError, match=r"data.tokenizer: unknown key\(s\) \['from_bsae'\]"):
        MoSTDataModule.from_settings(data_dir=str(shared_data_dir), corpus=TINY_RECIPE,
                                     tokenizer={"from_bsae": str(tmp_path)})
    build_tiny_corpus(shared_data_dir)
    dm = MoSTDataModule.from_settings(data_dir=str(shared_data_dir), corpus=TINY_RECIPE, progress=False,
                                      tokenizer={"from_base": str(tmp_path / "no_ckpt")})
    with pytest.raises(BaseTokenizerError, match="no_ckpt: no tokenizer.json"):
        _ = dm.tokenizer
