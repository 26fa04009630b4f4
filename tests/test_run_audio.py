"""run.py end to end with the speech front ends of conf/audio on the tiny config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import FAST_OVERRIDES, compose_run_config
from test_run import read_metrics


@pytest.mark.slow
def test_run_trains_and_tests_with_continuous_audio(tmp_path, shared_data_dir, single_thread):
    from hydra.core.global_hydra import GlobalHydra

    from run import train

    cfg = compose_run_config([*FAST_OVERRIDES, "audio=continuous", f"paths.data_dir={shared_data_dir}"], tmp_path)
    try:
        metrics = train(cfg)
    finally:
        GlobalHydra.instance().clear()
    run_dir = Path(cfg.paths.output_dir)
    on_disk = read_metrics(run_dir)
    assert math.isfinite(on_disk["test/asr_wer"]) and math.isfinite(metrics["train/loss_task_asr"])
    ckpt = torch.load(next((run_dir / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert state["audio_input.proj.weight"].shape == (cfg.model.hidden_size, 64)  # tiny HuBERT: 64-d features
    assert ckpt["hyper_parameters"]["audio"]["mode"] == "continuous"


@pytest.mark.slow
def test_run_with_hubert_units_builds_the_corpus_with_hubert_units(tmp_path, single_thread):
    """audio=hubert_units: the corpus units come from the (offline: random tiny) HuBERT's layer 11 + k-means, and
    re-extracting an utterance's units from its audio with the saved extractor gives the stored units."""
    import io
    import json

    import numpy as np
    from hydra.core.global_hydra import GlobalHydra

    from most_lightning.audio import UnitExtractor, read_audio
    from most_lightning.data.testing import read_shard
    from run import train

    data_dir = tmp_path / "data"
    cfg = compose_run_config([*FAST_OVERRIDES, "audio=hubert_units", f"paths.data_dir={data_dir}"], tmp_path)
    try:
        train(cfg)
    finally:
        GlobalHydra.instance().clear()
    read_metrics(Path(cfg.paths.output_dir))
    (corpus,) = [p for p in (data_dir / "demo").iterdir() if p.is_dir()]
    meta = json.loads((corpus / "unit_extractor" / "unit_extractor.json").read_text())
    assert meta["encoder"]["kind"] == "hubert" and meta["encoder"]["layer"] == 11 and meta["frame_rate"] == 25.0
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["recipe"]["unit_encoder"]["kind"] == "hubert"
    extractor = UnitExtractor.load(corpus / "unit_extractor")
    sample = read_shard(corpus / manifest["speech"]["train"]["shards"][0]["path"])[0]
    wave, _ = read_audio(sample["flac"])
    stored = np.load(io.BytesIO(sample["units.npy"]), allow_pickle=False)
    assert extractor(wave).tolist() == stored.tolist()
