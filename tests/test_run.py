"""run.py end to end on the tiny config: fit + test + metrics.json, the 4-cell multirun, the returned metric."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import FAST_OVERRIDES, REPO_ROOT

REQUIRED_METRICS = [
    "test/asr_wer",
    "test/tts_unit_nll",
    "test/tts_unit_acc",
    "test/text_nll",
    "test/expert_load/load_max_over_mean_text",
    "test/expert_load/load_max_over_mean_audio",
    "test/expert_load/audio_to_audio_group",
    "val/nll",
]


def read_metrics(run_dir: Path) -> dict[str, float]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    assert not missing, f"{run_dir}/metrics.json lacks {missing}; has {sorted(metrics)}"
    bad = {k: metrics[k] for k in REQUIRED_METRICS if metrics[k] is None or not math.isfinite(metrics[k])}
    assert not bad, f"non-finite metrics in {run_dir}: {bad}"
    return metrics


@pytest.mark.slow
def test_train_test_writes_metrics_and_returns_the_optimized_metric(cfg_fast):
    from omegaconf import open_dict

    from most_lightning.lit.runtime import optimized_metric
    from run import train

    with open_dict(cfg_fast):  # the held-out ASR WER curve of experiment=demo_long
        cfg_fast.callbacks.asr_wer_curve = {"_target_": "most_lightning.lit.asr_curve.ASRWERCurve", "limit": 4}
    metrics = train(cfg_fast)
    # test_asr_mismatched (default true): the text-prior baseline at validation and at test
    for name in ("val/asr_wer", "val/asr_mismatched_wer", "test/asr_mismatched_wer"):
        assert 0 <= metrics[name] and math.isfinite(metrics[name]), name
    assert metrics["test/asr_mismatched_n_utterances"] == metrics["test/asr_n_utterances"] > 0
    run_dir = Path(cfg_fast.paths.output_dir)
    on_disk = read_metrics(run_dir)
    assert on_disk["test/asr_wer"] == pytest.approx(metrics["test/asr_wer"])
    assert optimized_metric(metrics, cfg_fast.optimized_metric) == pytest.approx(metrics["val/nll"])
    assert list((run_dir / "checkpoints").glob("*.ckpt"))
    for name in ("expert_load_train.csv", "expert_load_train.png", "expert_load_test.csv", "config_resolved.yaml"):
        assert (run_dir / name).is_file(), name
    saved = OmegaConf.load(run_dir / "config_resolved.yaml")
    assert saved.router.name == cfg_fast.router.name and saved.trainer.max_steps == cfg_fast.trainer.max_steps
    with pytest.raises(KeyError, match="was not logged"):
        optimized_metric(metrics, "val/no_such_metric")


@pytest.mark.slow
def test_multirun_router_by_shared_experts_grid(tmp_path, shared_data_dir, single_thread):
    """`python run.py -m router=vanilla,modality_aware model.n_shared_experts=0,2 trainer.max_steps=20`: 20 steps
    and validation every 50 used to end every cell without val/nll and the multirun with a KeyError."""
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "-m", "router=vanilla,modality_aware", "model.n_shared_experts=0,2",
           *FAST_OVERRIDES, "trainer.max_steps=20", "trainer.val_check_interval=50",
           f"paths.data_dir={shared_data_dir}", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep_dir}"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert len(run_dirs) == 4, [p.name for p in run_dirs]
    cells = set()
    for run_dir in run_dirs:
        read_metrics(run_dir)
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")  # Hydra's record of the job's config
        cells.add((cfg.router.name, cfg.model.n_shared_experts))
        group_fraction = read_metrics(run_dir)["test/expert_load/audio_to_audio_group"]
        if cfg.router.name == "modality_aware":
            assert group_fraction == pytest.approx(1.0)  # audio tokens never leave the audio group
    assert cells == {("vanilla", 0), ("vanilla", 2), ("modality_aware", 0), ("modality_aware", 2)}


@pytest.mark.slow
def test_bf16_mixed_precision_trains_with_gradient_clipping(cfg_fast):
    """Lightning refuses to clip a fused optimizer's gradients under its mixed-precision plugin: the run must build
    an optimizer that it can clip."""
    from omegaconf import open_dict

    from run import train

    with open_dict(cfg_fast):
        cfg_fast.trainer.precision = "bf16-mixed"
    assert cfg_fast.trainer.gradient_clip_val > 0
    metrics = train(cfg_fast)
    assert metrics["train/loss"] < 100 and math.isfinite(metrics["train/loss"])
    read_metrics(Path(cfg_fast.paths.output_dir))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_ddp_spawn_on_cpu(cfg_fast):
    """Metrics and expert-load counts are reduced across ranks (and the run does not hang)."""
    from omegaconf import open_dict

    from run import train

    with open_dict(cfg_fast):
        cfg_fast.trainer.strategy = "ddp_spawn"
        cfg_fast.trainer.devices = 2
        cfg_fast.logger = None  # Lightning's CSVLogger loses its header between ddp_spawn fit and test
    train(cfg_fast)
    read_metrics(Path(cfg_fast.paths.output_dir))
