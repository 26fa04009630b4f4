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
