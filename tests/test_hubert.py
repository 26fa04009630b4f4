"""HuBERT encoder: one random transformers HubertModel written as a fairseq checkpoint, a HF directory and a
torchaudio state dict gives identical features from all three, equal to transformers' own hidden states."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from most_lightning.audio.hubert import HubertArch, HubertEncoder, build_hubert_encoder
from most_lightning.audio.hubert_checkpoints import (HubertCheckpointError, parse_conv_layers,
                                                     read_hubert_checkpoint, save_torchaudio_checkpoint)

transformers = pytest.importorskip("transformers")

CONV_50HZ = dict(conv_dim=(32, 32, 32, 32, 32), conv_kernel=(10, 8, 4, 2, 2), conv_stride=(5, 4, 4, 2, 2))
CONV_25HZ = dict(conv_dim=(32,) * 6, conv_kernel=(10, 8, 4, 2, 2, 2), conv_stride=(5, 4, 4, 2, 2, 2))


def hf_model(seed: int = 0, large: bool = False, conv=CONV_50HZ):
    torch.manual_seed(seed)
    extra = dict(feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True) if large else {}
    cfg = transformers.HubertConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                                    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                    attn_implementation="eager", **conv, **extra)
    model = transformers.HubertModel(cfg).eval()
    with torch.no_grad():  # random norms/biases too, so a mixed-up key cannot hide behind ones and zeros
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_hidden(model, wave: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(wave[None], output_hidden_states=True)
    return out.hidden_states[layer][0]


# ---------------------------------------------------------------------------------------------- fairseq writer
# fairseq's own module names (fairseq/models/hubert/hubert.py, wav2vec2.py), written out by hand here so the
# test does not reuse the loader's table.
def hf_to_fairseq_state(model) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        k = key
        if k == "masked_spec_embed":
            k = "mask_emb"
        elif k.startswith("feature_extractor.conv_layers."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            if rest.startswith("conv."):
                k = f"feature_extractor.conv_layers.{i}.0.{rest[5:]}"
            elif model.config.feat_extract_norm == "group":
                k = f"feature_extractor.conv_layers.{i}.2.{rest[len('layer_norm.'):]}"
            else:  # layer mode: nn.Sequential(TransposeLast(), Fp32LayerNorm, TransposeLast())
                k = f"feature_extractor.conv_layers.{i}.2.1.{rest[len('layer_norm.'):]}"
        elif k.startswith("feature_projection.layer_norm."):
            k = "layer_norm." + k.split(".")[-1]
        elif k.startswith("feature_projection.projection."):
            k = "post_extract_proj." + k.split(".")[-1]
        elif k.startswith("encoder.pos_conv_embed.conv."):
            tail = {"bias": "bias", "parametrizations.weight.original0": "weight_g",
                    "parametrizations.weight.original1": "weight_v", "weight_g": "weight_g",
                    "weight_v": "weight_v"}[k[len("encoder.pos_conv_embed.conv."):]]
            k = "encoder.pos_conv.0." + tail
        elif k.startswith("encoder.layers."):
            parts = k.split(".")
            i, rest = parts[2], ".".join(parts[3:])
            rest = (rest.replace("attention.", "self_attn.").replace("feed_forward.intermediate_dense", "fc1")
                    .replace("feed_forward.output_dense", "fc2"))
            if rest.startswith("layer_norm."):
                rest = "self_attn_" + rest
            k = f"encoder.layers.{i}.{rest}"
        out[k] = value.clone()
    out["label_embs_concat"] = torch.randn(504, 16)  # pretraining-only parameters a real checkpoint carries
    out["final_proj.weight"], out["final_proj.bias"] = torch.randn(16, 48), torch.randn(16)
    return out


def fairseq_model_cfg(model) -> dict:
    c = model.config
    layers = " + ".join(f"[({d},{k},{s})]" for d, k, s in zip(c.conv_dim, c.conv_kernel, c.conv_stride))
    return {"_name": "hubert", "label_rate": 25.0, "extractor_mode": "default" if c.feat_extract_norm == "group"
            else "layer_norm", "encoder_layers": c.num_hidden_layers, "encoder_embed_dim": c.hidden_size,
            "encoder_ffn_embed_dim": c.intermediate_size, "encoder_attention_heads": c.num_attention_heads,
            "activation_fn": "gelu", "layer_type": "transformer", "dropout": 0.1, "attention_dropout": 0.1,
            "final_dim": 16, "untie_final_proj": False, "layer_norm_first": c.do_stable_layer_norm,
            "conv_feature_layers": layers, "conv_bias": c.conv_bias, "conv_pos": c.num_conv_pos_embeddings,
            "conv_pos_groups": c.num_conv_pos_embedding_groups, "latent_temp": [2.0, 0.5, 0.999995],
            "mask_prob": 0.8, "required_seq_len_multiple": 2}


def write_fairseq_checkpoint(model, path, style: str = "cfg") -> None:
    """A checkpoint with the non-tensor entries a real fairseq HuBERT checkpoint has: plain cfg dict (or an
    argparse.Namespace), fairseq Dictionary objects, numpy scalars/arrays in the meters' state."""
    fake = types.ModuleType("fairseq.data.dictionary")

    class Dictionary:  # pickled by name as fairseq.data.dictionary.Dictionary
        def __init__(self, symbols):
            self.bos_word, self.unk_word, self.pad_word, self.eos_word = "<s>", "<unk>", "<pad>", "</s>"
            self.symbols, self.count = list(symbols), [1] * len(symbols)
            self.indices = {s: i for i, s in enumerate(symbols)}
            self.nspecial = 4

    Dictionary.__module__, Dictionary.__qualname__ = "fairseq.data.dictionary", "Dictionary"
    fake.Dictionary = Dictionary
    names = ["fairseq", "fairseq.data", "fairseq.data.dictionary"]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = fake if n.endswith("dictionary") else types.ModuleType(n)
    try:
        model_cfg = fairseq_model_cfg(model)
        task_cfg = {"_name": "hubert_pretraining", "data": "/data", "labels": ["km"], "label_rate": 25.0,
                    "sample_rate": 16000, "normalize": False}
        ckpt = {"model": hf_to_fairseq_state(model),
                "optimizer_history": [{"criterion_name": "HubertCriterion", "optimizer_name": "FairseqAdam",
                                       "lr_scheduler_state": {"best": None}, "num_updates": 400000}],
                "task_state": {"dictionaries": [Dictionary(["<s>", "<pad>", "</s>", "<unk>"] + [str(i) for i in
                                                                                             range(500)])]},
                "extra_state": {"metrics": {"train": [("loss", 0, "AverageMeter", {"val": np.float64(2.5),
                                                                                   "count": np.int64(10)})]},
                                "previous_training_time": np.float64(12345.6), "lr_hist": np.arange(3.0)},
                "last_optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-4}]}}
        if style == "cfg":
            ckpt |= {"args": None, "cfg": {"_name": None, "common": {"fp16": True, "seed": 1337},
                                           "model": model_cfg, "task": task_cfg}}
        else:  # older fairseq: one argparse.Namespace for model and task
            ckpt |= {"args": argparse.Namespace(arch="hubert", **{k: v for k, v in model_cfg.items() if k != "_name"},
                                                normalize=False, sample_rate=16000)}
        torch.save(ckpt, path)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def write_all_formats(model, tmp_path):
    from torchaudio.models.wav2vec2.utils import import_huggingface_model

    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    fairseq_path = tmp_path / "hubert_fairseq.pt"
    write_fairseq_checkpoint(model, fairseq_path)
    ta_path = tmp_path / "hubert_torchaudio.safetensors"
    imported = import_huggingface_model(model)  # torchaudio's own conversion: an independent key mapping
    arch = read_hubert_checkpoint(hf_dir).arch
    save_torchaudio_checkpoint(imported, arch, ta_path)
    return {"fairseq": fairseq_path, "hf": hf_dir, "torchaudio": ta_path}


@pytest.fixture
def wave():
    torch.manual_seed(1)
    return 0.1 * torch.randn(16000 + 123)


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
@pytest.mark.parametrize("large", [False, True], ids=["base_layout", "large_layout"])
def test_three_formats_give_identical_features_equal_to_transformers(tmp_path, wave, large):
    model = hf_model(large=large)
    paths = write_all_formats(model, tmp_path)
    n_layers = model.config.num_hidden_layers
    for layer in (2, n_layers):
        feats = {}
        for fmt, path in paths.items():
            enc = HubertEncoder.from_checkpoint(str(path), layer=layer)
            assert enc.source["format"] == fmt
            feats[fmt] = enc(wave)
        reference = hf_hidden(model, wave, layer)
        assert feats["fairseq"].shape == reference.shape == (feats["fairseq"].shape[0], 48)
        assert torch.equal(feats["fairseq"], feats["hf"]) and torch.equal(feats["hf"], feats["torchaudio"])
        torch.testing.assert_close(feats["hf"], reference, atol=2e-5, rtol=1e-4)
    # "last" is a full forward pass: the last layer, plus the final LayerNorm of pre-norm models
    with torch.no_grad():
        full = model(wave[None]).last_hidden_state[0]
    for fmt, path in paths.items():
        torch.testing.assert_close(HubertEncoder.from_checkpoint(str(path), layer="last")(wave), full,
                                   atol=2e-5, rtol=1e-4)


def test_fairseq_checkpoint_with_argparse_namespace_and_25hz_conv_stack(tmp_path, wave):
    model = hf_model(seed=3, conv=CONV_25HZ)
    path = tmp_path / "old_style.pt"
    write_fairseq_checkpoint(model, path, style="args")
    enc = HubertEncoder.from_checkpoint(str(path), layer=2)
    assert enc.frame_rate == 25.0 and enc.arch.hop_length == 640
    feats = enc(wave)
    reference = hf_hidden(model, wave, 2)
    assert feats.shape[0] == enc.n_frames(wave.numel()) == reference.shape[0]
    torch.testing.assert_close(feats, reference, atol=2e-5, rtol=1e-4)
    assert abs(feats.shape[0] - wave.numel() / 640) < 2  # 25 frames per second of audio


def test_fairseq_loader_never_runs_pickled_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": {"model": {}}, "extra_state": Exploit()}, path)
    with pytest.raises(HubertCheckpointError, match=r"evil\.pt.*refusing to unpickle global '(posix|os)\.system'"):
        HubertEncoder.from_checkpoint(str(path))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_padded_batch_equals_each_utterance_alone(tmp_path):
    """The reference passed HuBERT an inverted padding mask; here each utterance's features in a padded batch
    equal its features alone, for both group-norm (run one by one) and layer-norm (one batch + lengths)."""
    for large in (False, True):
        model = hf_model(large=large)
        model.save_pretrained(tmp_path / f"hf{large}")
        enc = HubertEncoder.from_checkpoint(str(tmp_path / f"hf{large}"), layer="last")
        torch.manual_seed(2)
        waves = [0.1 * torch.randn(n) for n in (16000, 7000, 11111)]
        batch = enc.encode_batch(waves)
        for w, f in zip(waves, batch):
            assert f.shape[0] == enc.n_frames(w.numel())
            torch.testing.assert_close(f, enc(w), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(f, hf_hidden(model, w, 3) if not large else
                                       model(w[None]).last_hidden_state[0].detach(), atol=2e-5, rtol=1e-4)


def test_encoder_is_frozen_and_stays_in_eval_mode():
    enc = HubertEncoder.random("tiny", layer="last", seed=0)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.model.training
    same = HubertEncoder.random("tiny", layer="last", seed=0)
    w = torch.randn(8000)
    assert torch.equal(enc(w), same(w))  # seeded: the offline demo encoder is reproducible
    rebuilt = build_hubert_encoder(enc.config())
    assert torch.equal(rebuilt(w), enc(w))
    assert enc.frame_rate == 25.0 and enc(w).shape == (enc.n_frames(8000), 64)


def test_bare_torchaudio_state_dict_needs_arch(tmp_path):
    enc = HubertEncoder.random("tiny", seed=4)
    path = tmp_path / "bare.pt"
    torch.save(enc.model.state_dict(), path)
    with pytest.raises(HubertCheckpointError, match=r"bare\.pt.*does not say its architecture"):
        read_hubert_checkpoint(path)
    ck = read_hubert_checkpoint(path, arch="tiny")
    loaded = HubertEncoder(ck.arch, "last")
    loaded.load_converted(ck.state_dict)
    w = torch.randn(5000)
    assert torch.equal(loaded(w), enc(w))


# ---------------------------------------------------------------------------------------------- bad input
def test_checkpoints_of_another_layout_name_file_and_key(tmp_path):
    model = hf_model()
    # a wav2vec2 HF directory
    w2v = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(hidden_size=48, num_hidden_layers=1,
                                                                 num_attention_heads=4, intermediate_size=96,
                                                                 **CONV_50HZ))
    w2v.save_pretrained(tmp_path / "w2v")
    with pytest.raises(HubertCheckpointError, match=r"w2v/config\.json.*model_type='wav2vec2'"):
        HubertEncoder.from_checkpoint(str(tmp_path / "w2v"))
    # a fairseq checkpoint whose cfg says wav2vec2
    path = tmp_path / "w2v_fairseq.pt"
    torch.save({"model": hf_to_fairseq_state(model), "cfg": {"model": {"_name": "wav2vec2"}, "task": {}}}, path)
    with pytest.raises(HubertCheckpointError, match=r"w2v_fairseq\.pt.*cfg\.model\._name='wav2vec2'"):
        HubertEncoder.from_checkpoint(str(path))
    # a fairseq HuBERT whose weights have a key of another layout
    state = hf_to_fairseq_state(model)
    state["encoder.layers.0.conformer_conv.weight"] = torch.zeros(1)
    path = tmp_path / "odd_keys.pt"
    torch.save({"model": state, "cfg": {"model": fairseq_model_cfg(model), "task": {}}}, path)
    with pytest.raises(HubertCheckpointError, match=r"odd_keys\.pt.*encoder\.layers\.0\.conformer_conv\.weight"):
        HubertEncoder.from_checkpoint(str(path))
    # config and weights disagree (one layer more in the config)
    cfg = fairseq_model_cfg(model) | {"encoder_layers": 4}
    path = tmp_path / "deeper_cfg.pt"
    torch.save({"model": hf_to_fairseq_state(model), "cfg": {"model": cfg, "task": {}}}, path)
    with pytest.raises(HubertCheckpointError, match=r"deeper_cfg\.pt.*missing keys.*layers\.3"):
        HubertEncoder.from_checkpoint(str(path))
    model.save_pretrained(tmp_path / "good")
    with pytest.raises(ValueError, match="layer must be in 1..3"):
        HubertEncoder.from_checkpoint(str(tmp_path / "good"), layer=7)


def test_conv_stack_string_is_parsed_without_eval():
    assert parse_conv_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2") == \
        ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
    with pytest.raises(HubertCheckpointError, match="conv_feature_layers"):
        parse_conv_layers("__import__('os').system('true')", "x.pt")
    assert HubertArch(conv_layers=parse_conv_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 3")).frame_rate == 25
