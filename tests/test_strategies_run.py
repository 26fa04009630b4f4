"""run.py end to end with several processes: DDP and DeepSpeed ZeRO-2/3 ranks started the way torchrun starts
them (so the run-dir pinning is exercised), ddp_spawn started by Lightning; fit + test with the default loggers;
one run directory, metrics.json written once, by rank 0."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import FAST_OVERRIDES, REPO_ROOT
from tests.distributed import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CHEAP = ["test_asr_mismatched=false", "trainer.max_steps=4", "trainer.val_check_interval=4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from most_lightning.data.testing import build_tiny_corpus

    data = tmp_path_factory.getbasetemp() / "most_data_corpus"
    build_tiny_corpus(data)
    return data


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2", "deepspeed_zero3"])
def test_launched_ranks_fit_test_and_write_one_run_dir(strategy, corpus, tmp_path):
    logs = tmp_path / "logs"
    args = ["run.py", *FAST_OVERRIDES, *CHEAP, f"paths.data_dir={corpus}", f"paths.log_dir={logs}",
            f"strategy={strategy}", "trainer.devices=2"]
    results = launch(args, 2, timeout=900, cwd=REPO_ROOT, extra_env={"HYDRA_FULL_ERROR": "1"})
    for rank, res in enumerate(results):
        assert res.returncode == 0, f"rank {rank}:\n{res.stdout[-5000:]}"
    runs = list((logs / "train" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("torchrun-"), runs
    run = runs[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/nll"] > 0 and "test/asr_wer" in metrics and "test/text_nll" in metrics
    assert sum("metrics written to" in r.stdout for r in results) == 1
    assert "metrics written to" in results[0].stdout
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "run_rank1.log").is_file()
    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/loss") for r in rows) and any(r.get("test/text_nll") for r in rows)
    expected = "CPUDeepSpeedStrategy" if strategy.startswith("deepspeed") else "DDPStrategy"
    assert expected in (run / "run.log").read_text()


def test_ddp_spawn_fit_and_test_with_the_csv_logger(corpus, tmp_path, single_thread):
    """ddp_spawn runs fit and test in separate worker copies of the logger: metrics.csv keeps both."""
    from conftest import compose_run_config
    from run import train

    cfg = compose_run_config([*FAST_OVERRIDES, *CHEAP, f"paths.data_dir={corpus}", "strategy=ddp_spawn",
                              "trainer.devices=2"], tmp_path)
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    assert json.loads((run / "metrics.json").read_text())["test/text_nll"] == pytest.approx(metrics["test/text_nll"])
    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/loss") for r in rows) and any(r.get("test/text_nll") for r in rows)


def test_multirun_with_ddp_stops_before_any_work(tmp_path):
    """`-m` with a strategy whose workers re-run the command line: a clear error, no data prepared, no hang."""
    import subprocess
    import sys

    cmd = [sys.executable, "run.py", "-m", "router=vanilla,modality_aware", "strategy=ddp", "trainer.devices=2",
           f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    output = result.stderr + result.stdout
    assert "inside a multirun (-m)" in output and "re-enter the sweep" in output
    assert not (tmp_path / "data").exists()
