"""A tiny model trained once per session through run.py, and a helper that runs `run.py mode=eval` on it.
Import both names into a test module: `from eval_fixtures import run_eval_cli, tiny_run  # noqa: F401`.
For scoring tasks without a run: an untrained tiny model, the oracle NLL of one sequence under it, and a task's
settings as its yaml writes them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import CONF_DIR, FAST_OVERRIDES, REPO_ROOT
from most_lightning.model import MoSTConfig, MoSTForCausalLM


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir with checkpoints/last.ckpt and metrics.json of the Lightning test, data dir): FAST_OVERRIDES
    training, seconds."""
    base = tmp_path_factory.mktemp("eval_train")
    data_dir = tmp_path_factory.getbasetemp() / "most_data_corpus"
    run_dir = base / "run"
    cmd = [sys.executable, "run.py", *FAST_OVERRIDES, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
           f"paths.log_dir={base / 'logs'}", "test_asr_mismatched=false"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, data_dir


def run_eval_cli(tiny_run, out: Path, *overrides: str, check: bool = True) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir, data_dir = tiny_run
    cmd = [sys.executable, "run.py", "mode=eval", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
           *FAST_OVERRIDES, f"paths.data_dir={data_dir}", f"hydra.run.dir={out}", "eval.progress=false", *overrides]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def untrained_tiny_model(vocab_size: int, seed: int = 0) -> MoSTForCausalLM:
    """A tiny modality-aware MoE model (in eval mode) with random weights, sharp enough that sequences differ."""
    torch.manual_seed(seed)
    config = MoSTConfig.from_preset("tiny", vocab_size=vocab_size, hidden_size=32, num_heads=2, kv_lora_rank=8,
                                    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=64,
                                    moe_intermediate_size=16)
    model = MoSTForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


@torch.no_grad()
def reference_nll(model: MoSTForCausalLM, ids: list[int], modality_of) -> tuple[float, int]:
    """Oracle: (summed NLL of ids[1:], their number), F.cross_entropy over the logits of the lone, unpadded
    sequence (no labels given to the model, so none of its loss code runs)."""
    x = torch.tensor([ids])
    logits = model(x, modality_of(x)).logits[0, :-1].double()
    return float(F.cross_entropy(logits, x[0, 1:], reduction="sum")), len(ids) - 1


def task_settings(task: str, **overrides) -> dict:
    """The keyword arguments of an eval task's function: conf/eval/tasks/<task>.yaml (the one place its settings
    are written) with `overrides` on top; an override the yaml does not have is refused."""
    settings = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "eval" / "tasks" / f"{task}.yaml"))
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise KeyError(f"conf/eval/tasks/{task}.yaml has no setting(s) {unknown}")
    return {**settings, **overrides}
