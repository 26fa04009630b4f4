"""The two MoST training stages end to end on the tiny demo corpus: `experiment=stage1_asr_tts` and
`experiment=stage2_instruct` (with the demo chat set it builds on first use)."""

from __future__ import annotations

import collections
import io
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import FAST_OVERRIDES, compose_run_config

# the reference optimiser settings scaled for a tiny model trained from scratch, as the recipes' comments say
TINY_SCALE = ["trainer.accumulate_grad_batches=1", "strategy.global_batch_size=null", "lit.optimizer.lr=1e-3",
              "data.max_length=null", "data.shuffle_buffer=20"]


@pytest.fixture
def tiny_corpus(shared_data_dir):
    from most_lightning.data.testing import build_tiny_corpus

    return build_tiny_corpus(shared_data_dir)


def run_recipe(experiment, shared_data_dir, tmp_path, extra=()):
    from run import train

    cfg = compose_run_config([*FAST_OVERRIDES, f"experiment={experiment}", f"paths.data_dir={shared_data_dir}",
                              *TINY_SCALE, *extra], tmp_path)
    return cfg, train(cfg)


def tasks_seen(cfg, n_batches=40):
    """Task counts over n_batches of the recipe's training stream (same config, no model)."""
    from hydra.utils import instantiate

    with open_dict(cfg):
        cfg.data.batches_per_epoch = n_batches
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return collections.Counter(t for b in dm.train_dataloader() for t in b["task"])


def check_mix(counts, weights):
    n = sum(counts.values())
    total = sum(weights.values())
    assert set(counts) == set(weights), counts
    for task, w in weights.items():
        p = w / total
        assert abs(counts[task] / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-9, (counts, weights)


@pytest.mark.slow
def test_stage1_asr_tts_runs_end_to_end(tiny_corpus, shared_data_dir, tmp_path, single_thread):
    from most_lightning.data.testing import bad_variant, read_shard, write_shard

    # a third source whose shard is mostly broken: its skips must reach the logged metrics, by kind
    good = read_shard(next((tiny_corpus / "speech").glob("train-*.tar")))
    bad = write_shard(tmp_path / "bad.tar", [bad_variant(good[0], "garbage_audio"),
                                             bad_variant(good[1], "wrong_sample_rate"), good[2]])
    cfg, metrics = run_recipe("stage1_asr_tts", shared_data_dir, tmp_path, [
        f"+data.sources.broken.shards={bad}", "+data.sources.broken.tasks.asr=0.3"])
    assert metrics["train/n_skipped/undecodable_audio"] >= 1 and metrics["train/n_skipped/wrong_sample_rate"] >= 1
    assert metrics["train/n_skipped"] >= 2
    with open_dict(cfg):
        del cfg.data.sources["broken"]
    assert cfg.lit.optimizer.betas == [0.9, 0.95] and cfg.lit.optimizer.weight_decay == 0.0
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.data.shard_sampling == "resampled"
    for name in ("train/loss", "val/nll", "test/asr_wer", "test/tts_unit_nll", "test/text_nll"):
        assert math.isfinite(metrics[name]), name
    assert (Path(cfg.paths.output_dir) / "metrics.json").is_file()
    ckpt = next((Path(cfg.paths.output_dir) / "checkpoints").glob("last*.ckpt"))
    import torch

    position = torch.load(ckpt, weights_only=True)["MoSTDataModule"]
    assert position["ranks"]["0"]["0"]["batches"] == cfg.trainer.max_steps
    check_mix(tasks_seen(cfg), {"asr": 0.4, "tts": 0.4, "text": 0.2})


@pytest.mark.slow
def test_stage2_instruct_builds_the_demo_chat_set_and_runs_end_to_end(shared_data_dir, tmp_path, single_thread):
    """From a fresh data dir as far as the chat set goes: no manual step, the set is built with the corpus's units."""
    import numpy as np

    from most_lightning.audio.units import UnitExtractor
    from most_lightning.data.demo_chat_set import demo_chat_dir_for
    from most_lightning.data.testing import TINY_RECIPE, build_tiny_corpus, read_shard

    cfg, metrics = run_recipe("stage2_instruct", shared_data_dir, tmp_path)
    assert cfg.data.sources.chat.shards == "demo_chat" and cfg.data.demo_chat.n_train == 6
    corpus = build_tiny_corpus(shared_data_dir)  # cached: the run built it
    chat_dir = demo_chat_dir_for(instantiate_recipe(cfg), shared_data_dir, corpus / "unit_extractor")
    manifest = json.loads((chat_dir / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 6 and manifest["splits"]["validation"]["samples"] == 2
    # the voiced turns' units are the corpus extractor's units of that turn's audio (independent re-extraction)
    extractor = UnitExtractor.load(corpus / "unit_extractor")
    sample = read_shard(next(chat_dir.glob("train-*.tar")))[0]
    turns = json.loads(sample["messages.json"])
    voiced = [t for t in turns if t["units"]]
    assert voiced and all(t["audio"] for t in voiced)
    from most_lightning.audio.io import read_audio

    wave, _ = read_audio(sample[voiced[0]["audio"]], target_sample_rate=16000, name="turn")
    units = np.load(io.BytesIO(sample[voiced[0]["units"]]), allow_pickle=False)
    assert units.max() < TINY_RECIPE.n_units
    assert np.array_equal(units, extractor(wave).numpy())
    for name in ("train/loss", "val/nll", "test/asr_wer"):
        assert math.isfinite(metrics[name]), name
    assert metrics["train/n_skipped"] == 0
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["train/loss"] == metrics["train/loss"]
    check_mix(tasks_seen(cfg), {"speech_chat": 0.4, "text_chat": 0.4, "asr": 0.1, "tts": 0.1})


def instantiate_recipe(cfg):
    from most_lightning.data.demo_chat_set import DemoChatRecipe

    return DemoChatRecipe.from_any(OmegaConf.to_container(cfg.data.demo_chat))


def test_stage2_without_a_chat_set_names_the_missing_path_and_the_command(tmp_path, shared_data_dir):
    from hydra.utils import instantiate

    from most_lightning.data.testing import build_tiny_corpus

    build_tiny_corpus(shared_data_dir)
    cfg = compose_run_config([*FAST_OVERRIDES, "experiment=stage2_instruct", f"paths.data_dir={shared_data_dir}",
                              f"data.sources.chat.shards={tmp_path}/no_chat_here"], tmp_path)
    dm = instantiate(cfg.data)
    with pytest.raises(FileNotFoundError, match="'chat'.*no_chat_here.*most_lightning.data.prepare"):
        dm.setup("fit")  # run.py calls this before building the model


def test_demo_chat_set_is_cached_by_recipe_and_unit_extractor(tmp_path):
    from most_lightning.data.demo_chat_set import DemoChatRecipe, build_demo_chat, demo_chat_dir_for, resolve_demo_chat

    units = tmp_path / "unit_extractor"
    units.mkdir()
    (units / "kmeans.safetensors").write_bytes(b"centroids v1")
    a = demo_chat_dir_for(DemoChatRecipe(n_train=3), tmp_path, units)
    assert a == demo_chat_dir_for(DemoChatRecipe(n_train=3), tmp_path, units)
    assert a != demo_chat_dir_for(DemoChatRecipe(n_train=4), tmp_path, units)
    (units / "kmeans.safetensors").write_bytes(b"centroids v2")  # a rebuilt corpus: other units, another set
    assert a != demo_chat_dir_for(DemoChatRecipe(n_train=3), tmp_path, units)
    with pytest.raises(ValueError, match=r"data.demo_chat: unknown keys \['n_trian'\]"):
        DemoChatRecipe.from_any({"n_trian": 3})
    with pytest.raises(FileNotFoundError, match="no_units.*unit_extractor"):
        demo_chat_dir_for(DemoChatRecipe(), tmp_path, tmp_path / "no_units")

    # text-only (no flite needed): built once, then found; the source points at its train shards only
    recipe = DemoChatRecipe(n_train=3, n_val=1, tts=None)
    out = build_demo_chat(recipe, tmp_path, units)
    manifest = out / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert json.loads(manifest.read_text())["splits"]["train"]["samples"] == 3
    assert build_demo_chat(recipe, tmp_path, units) == out and manifest.stat().st_mtime_ns == stamp
    resolved = resolve_demo_chat({"chat": {"shards": "demo_chat", "tasks": {"text_chat": 1}},
                                  "own": {"shards": "/data/x", "tasks": {"asr": 1}}}, lambda: out)
    assert resolved["chat"]["shards"] == f"{out}/train-*.tar" and resolved["own"]["shards"] == "/data/x"
