"""A tiny model trained once per session through run.py, and a helper that runs `run.py mode=eval` on it.
Import both names into a test module: `from eval_fixtures import run_eval_cli, tiny_run  # noqa: F401`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST_OVERRIDES, REPO_ROOT


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
