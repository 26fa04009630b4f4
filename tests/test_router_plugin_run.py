"""The plug-in proof: a router written outside the package (tests/plugins/annealed_router.py), selected with
router._target_ on the command line, trains, checkpoints, resumes, evaluates and runs in a -m sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST_OVERRIDES, REPO_ROOT, compose_run_config

PLUGIN = ["router._target_=tests.plugins.annealed_router.AnnealedRouter", "router.start_temperature=3.0",
          "router.decay=0.5"]
GATE = "model.model.layers.1.mlp.gate"


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_plugin_router_trains_checkpoints_resumes_and_evaluates(tmp_path, shared_data_dir, single_thread):
    from run import train

    common = [*FAST_OVERRIDES, *PLUGIN, f"paths.data_dir={shared_data_dir}", "test_asr_mismatched=false"]
    cfg = compose_run_config(common, tmp_path / "first")
    metrics = train(cfg)
    assert metrics["val/nll"] == metrics["val/nll"]  # finite: trained and validated
    first = Path(cfg.paths.output_dir)
    ckpt = _state(first)
    assert ckpt["hyper_parameters"]["router"]["_target_"] == "tests.plugins.annealed_router.AnnealedRouter"
    steps = int(ckpt["state_dict"][f"{GATE}.steps"])  # the per-step hook ran after every optimizer step
    assert steps == ckpt["global_step"] == cfg.trainer.max_steps
    assert float(ckpt["state_dict"][f"{GATE}.temperature"]) == pytest.approx(1 + 2 * 0.5 ** steps)

    # resume: the router's state continues from the checkpoint
    resumed = compose_run_config([*common, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
                                  f"trainer.max_steps={steps + 3}", "test=false"], tmp_path / "resumed")
    train(resumed)
    state = _state(Path(resumed.paths.output_dir))["state_dict"]
    assert int(state[f"{GATE}.steps"]) == steps + 3

    # evaluate the checkpoint with run.py mode=eval, the router given the same way
    out = tmp_path / "eval"
    cmd = [sys.executable, "run.py", "mode=eval", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", "eval=default",
           *common, f"hydra.run.dir={out}", "eval.progress=false", "eval.tasks.asr.limit=2",
           "eval.tasks.text_ppl.limit=2"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "eval_report.json").read_text())
    assert report["router"] == "tests.plugins.annealed_router.AnnealedRouter"


@pytest.mark.slow
def test_plugin_router_in_a_multirun_sweep(tmp_path, shared_data_dir, single_thread):
    cmd = [sys.executable, "run.py", "-m", *PLUGIN[:2], "router.decay=0.5,0.9", *FAST_OVERRIDES,
           f"paths.data_dir={shared_data_dir}", f"paths.log_dir={tmp_path}", "test_asr_mismatched=false"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    runs = sorted(tmp_path.glob("train/multirun/*/*/metrics.json"))
    assert len(runs) == 2
    decays = sorted(json.loads(json.dumps(_state(p.parent)["hyper_parameters"]["router"]["decay"])) for p in runs)
    assert decays == [0.5, 0.9]
