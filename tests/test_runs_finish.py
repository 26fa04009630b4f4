"""Runs and sweeps always finish with a result: a validation pass at the last step whenever the last one is older
(so val/nll exists for any max_steps), a missing objective is NaN with the reason (a multirun goes on to its next
cell, a sweeper records the trial FAILED with that reason), and the real 3-trial sweep at 20 steps completes."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import FAST_OVERRIDES, REPO_ROOT
from most_lightning.experiments.sweep_loop import FAIL_REASON, OUTPUT_DIR, outcome_from_return
from most_lightning.lit.runtime import MissingObjective, run_objective

optuna.logging.set_verbosity(optuna.logging.WARNING)
FRACTION = "model.audio_expert_fraction"


# ---- the final validation pass (a real Lightning fit of a one-parameter module) ----------------------------------
def _fit_and_record_validations(max_steps: int, val_check_interval: int, with_callback: bool, tmp_path: Path):
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from most_lightning.lit.final_validation import ValidateAtEnd

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.validated_at: list[int] = []

        def training_step(self, batch, batch_idx):
            return (self.w - 1.0).pow(2).sum() + 0 * batch.sum()

        def validation_step(self, batch, batch_idx):
            if batch_idx == 0:
                self.validated_at.append(self.global_step)
            self.log("val/nll", (self.w - 1.0).pow(2).sum())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    data = DataLoader(torch.zeros(400, 1), batch_size=4)  # 100 batches per epoch: the epoch never ends first
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val/nll", save_top_k=1,
                                                     filename="step_{step}", auto_insert_metric_name=False)
    callbacks = [checkpoint, *([ValidateAtEnd()] if with_callback else [])]
    trainer = L.Trainer(max_steps=max_steps, val_check_interval=val_check_interval, limit_val_batches=2,
                        check_val_every_n_epoch=None, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(module, data, data)
    return module.validated_at, trainer, checkpoint


@pytest.mark.parametrize("max_steps, interval, expected", [
    (7, 5, [5, 7]),      # the last validation (step 5) is older than the last step: one more at 7
    (3, 50, [3]),        # the case: fewer steps than the interval gave no validation at all
    (10, 5, [5, 10]),    # the last step is a validation step anyway: no second pass
])
def test_a_validation_pass_ends_every_fit(max_steps, interval, expected, tmp_path):
    before, _, _ = _fit_and_record_validations(max_steps, interval, with_callback=False, tmp_path=tmp_path / "a")
    assert before == [s for s in range(interval, max_steps + 1, interval)]  # Lightning alone: the interval only
    after, trainer, checkpoint = _fit_and_record_validations(max_steps, interval, with_callback=True,
                                                             tmp_path=tmp_path / "b")
    assert after == expected and trainer.global_step == max_steps
    assert "val/nll" in trainer.callback_metrics
    # the weights keep improving (w -> 1), so the final validation is the best one and the checkpoint saw it
    assert Path(checkpoint.best_model_path).name == f"step_{max_steps}.ckpt"


# ---- a missing objective: NaN with the reason ---------------------------------------------------------------------
def test_a_missing_objective_is_nan_with_the_reason(caplog):
    metrics = {"val/nll": 2.5, "test/asr_wer": 0.9}
    assert run_objective(metrics, "val/nll") == 2.5
    with caplog.at_level(logging.WARNING, logger="most_lightning.run"):
        value = run_objective(metrics, "val/missing")
    assert isinstance(value, MissingObjective) and math.isnan(value)
    assert "optimized_metric='val/missing' was not logged" in value.reason and "val/nll" in value.reason
    assert "objective of this run is NaN" in caplog.text and "val/missing" in caplog.text
    both = run_objective(metrics, ["test/asr_wer", "val/missing"])
    assert both[0] == 0.9 and math.isnan(both[1])
    assert run_objective(metrics, None) is None
    # what the sweeper makes of it: a failure that says why, not just "nan"
    outcome = outcome_from_return(value, 1)
    assert outcome.values is None and "objective 0 is missing" in outcome.reason and "val/missing" in outcome.reason
    outcome = outcome_from_return([0.9, both[1]], 2)
    assert outcome.values is None and "objective 1 is missing" in outcome.reason
    # it survives pickling (launchers that run jobs in other processes send the return value back pickled)
    import pickle

    again = pickle.loads(pickle.dumps(value))
    assert math.isnan(again) and again.reason == value.reason


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_multirun_cells_without_their_objective_all_run_and_exit_zero(tmp_path):
    """The basic launcher: every cell runs and writes metrics.json; the missing val/nll is a warning, not an abort."""
    sweep_dir = tmp_path / "multirun"
    result = _run([sys.executable, "run.py", "-m", "+quick_objective.metrics.quick_frac={" + FRACTION + ": 0.375}",
                   f"{FRACTION}=0.25,0.5,0.75", "optimized_metric=val/nll", f"paths.log_dir={tmp_path / 'logs'}",
                   f"hydra.sweep.dir={sweep_dir}"])
    assert result.returncode == 0, result.stderr[-4000:]
    cells = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in cells] == ["0", "1", "2"]
    for cell in cells:
        assert json.loads((cell / "metrics.json").read_text())["quick_frac"] >= 0
    assert (result.stdout + result.stderr).count("optimized_metric='val/nll' was not logged") == 3


@pytest.mark.slow
def test_sweep_records_a_trial_without_its_objective_as_failed_and_goes_on(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    result = _run([sys.executable, "run.py", "-m", "hparams_search=quick", f"paths.log_dir={tmp_path / 'logs'}",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.sweeper.n_trials=8",
                   f"hydra.sweeper.storage={storage}", "hydra.sweeper.sampler={name: random, seed: 1}",
                   f"hydra.sweeper.search_space={{{FRACTION}: {{type: float, low: 0.25, high: 0.75}}}}",
                   f"+quick_objective.drop_when={{{FRACTION}: [0.3, 0.45]}}",
                   f"+quick_objective.metrics.quick_frac={{{FRACTION}: 0.375}}", "optimized_metric=quick_frac"])
    assert result.returncode == 0, result.stderr[-4000:]
    study = optuna.load_study(study_name="quick", storage=storage)
    assert len(study.trials) == 8
    states = set()
    for trial in study.trials:
        x = trial.params[FRACTION]
        states.add(trial.state)
        if 0.3 <= x <= 0.45:
            reason = trial.user_attrs[FAIL_REASON]
            assert trial.state == TrialState.FAIL, (x, trial.state)
            assert "objective 0 is missing" in reason and "optimized_metric='quick_frac' was not logged" in reason
        else:
            assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx((x - 0.375) ** 2)
        assert (Path(trial.user_attrs[OUTPUT_DIR]) / "metrics.json").is_file()
    assert states == {TrialState.FAIL, TrialState.COMPLETE}


@pytest.mark.slow
def test_split_ratio_sweep_of_20_step_trials_completes(tmp_path, shared_data_dir):
    """`python run.py -m hparams_search=split_ratio hydra.sweeper.n_trials=3 trainer.max_steps=20`, on the tiny
    config with validation every 50 steps: every trial used to fail (val/nll never logged)."""
    sweep_dir = tmp_path / "sweep"
    result = _run([sys.executable, "run.py", "-m", "hparams_search=split_ratio", "hydra.sweeper.n_trials=3",
                   *FAST_OVERRIDES, "trainer.max_steps=20", "trainer.val_check_interval=50",
                   "trainer.limit_test_batches=1", f"paths.data_dir={shared_data_dir}",
                   f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep_dir}"])
    assert result.returncode == 0, result.stderr[-4000:]
    study = optuna.load_study(study_name="split_ratio", storage=f"sqlite:///{tmp_path / 'logs/optuna/split_ratio.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3, \
        [t.user_attrs.get(FAIL_REASON) for t in study.trials]
    run_dirs = sorted(Path(t.user_attrs[OUTPUT_DIR]) for t in study.trials)
    assert len(set(run_dirs)) == 3 and all(p.parent == sweep_dir for p in run_dirs)
    for trial in study.trials:
        metrics = json.loads((Path(trial.user_attrs[OUTPUT_DIR]) / "metrics.json").read_text())
        assert trial.value == pytest.approx(metrics["val/nll"])  # the objective is the final validation's NLL
        assert math.isfinite(metrics["test/asr_wer"])
    assert sorted(p.name for p in sweep_dir.iterdir() if (p / "metrics.json").is_file()) == ["0", "1", "2"]
