"""The Optuna sweeper plugin (hydra/sweeper=most_optuna) driven through run.py on the quick objective (a known
function of the overrides, no training): optimisation, failures, bad input, kill-and-resume, several workers,
pruning; and the pruning callback inside a real Lightning fit."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import REPO_ROOT
from most_lightning.experiments.search_space import SearchSpaceError, parse_search_space
from most_lightning.experiments.sweep_loop import FAIL_REASON, INTERRUPTED_ATTR, REQUEUED_FROM

optuna.logging.set_verbosity(optuna.logging.WARNING)
FRACTION, LR = "model.audio_expert_fraction", "lit.optimizer.lr"


def sweep_cmd(tmp_path: Path, *overrides: str, name: str = "sweep") -> list[str]:
    return [sys.executable, "run.py", "-m", "hparams_search=quick", f"paths.log_dir={tmp_path / 'logs'}",
            f"hydra.sweep.dir={tmp_path / name}", *overrides]


def run_sweep(tmp_path: Path, *overrides: str, name: str = "sweep", expect_ok: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run(sweep_cmd(tmp_path, *overrides, name=name), cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=600, env=env)
    if expect_ok:
        assert result.returncode == 0, result.stderr[-5000:]
    return result


def load(storage: str, name: str = "quick") -> optuna.Study:
    if storage.startswith("journal:///"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return optuna.load_study(study_name=name,
                                 storage=JournalStorage(JournalFileBackend(storage[len("journal://"):])))
    return optuna.load_study(study_name=name, storage=storage)


def quick_dist(params: dict) -> float:
    """The oracle: quick/dist of conf/hparams_search/quick.yaml."""
    return (params[FRACTION] - 0.375) ** 2 + ((params[LR] - 0.003) / 0.001) ** 2


# ---- search space parsing (no subprocess) ------------------------------------------------------------------------
@pytest.mark.parametrize("spec, match", [
    ({"a": {"type": "float", "low": 0.5, "high": 0.5}}, "empty range"),
    ({"a": {"type": "int", "low": 3, "high": 1}}, "empty range"),
    ({"a": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, "log=true needs low > 0"),
    ({"a": {"type": "categorical", "choices": []}}, "non-empty list"),
    ({"a": {"type": "uniform", "low": 0, "high": 1}}, "allowed types"),
    ({"a": {"type": "float", "low": 0, "high": 1, "when": {"b": 1}}}, "not parameters declared above"),
    ({"a": {"type": "float", "low": 0, "high": 1, "stepp": 0.1}}, "unknown keys"),
])
def test_bad_search_spaces_name_the_key(spec, match):
    with pytest.raises(SearchSpaceError, match=match) as info:
        parse_search_space(spec)
    assert "search_space.a" in str(info.value)


def test_conditional_parameters_follow_their_condition():
    space = parse_search_space({
        "router": {"type": "categorical", "choices": ["vanilla", "modality_aware"]},
        "router.mask": {"type": "categorical", "choices": ["probs", "logits"], "when": {"router": "modality_aware"}},
        "drop": None,  # removes an inherited parameter
    })
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    from most_lightning.experiments.search_space import suggest

    seen = set()
    for _ in range(20):
        values = suggest(study.ask(), space)
        assert ("router.mask" in values) == (values["router"] == "modality_aware")
        seen.add(values["router"])
    assert seen == {"vanilla", "modality_aware"} and [p.key for p in space] == ["router", "router.mask"]


# ---- sweeps through run.py ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_sweep_reaches_the_optimum(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    run_sweep(tmp_path, "hydra.sweeper.n_trials=25", f"hydra.sweeper.storage={storage}")
    study = load(storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 25
    for trial in complete:  # the value is the known function of the sampled overrides
        assert trial.value == pytest.approx(quick_dist(trial.params), rel=1e-9, abs=1e-12)
    best = study.best_trial
    # random points: lr is log-uniform over [1e-4, 1e-2], so a typical value is >> 1; TPE gets close
    assert best.value < 0.5 and abs(best.params[LR] - 0.003) < 7e-4, best.params
    # the job dirs hold the run records
    run_dir = Path(best.user_attrs["output_dir"])
    assert (run_dir / "metrics.json").is_file() and (run_dir / "config_resolved.yaml").is_file()
    assert (run_dir / "provenance.json").is_file()
    assert (tmp_path / "sweep" / "optimization_results.yaml").is_file()


@pytest.mark.slow
def test_failing_invalid_and_nan_trials_are_recorded_and_the_sweep_goes_on(tmp_path):
    storage = f"journal:///{tmp_path / 'study.log'}"
    run_sweep(tmp_path, "hydra.sweeper.n_trials=14", f"hydra.sweeper.storage={storage}",
              "hydra.sweeper.sampler={name: random, seed: 3}",
              # 8 experts, top_k 2: fractions below 0.25 / above 0.75 leave a group with < top_k experts
              f"hydra.sweeper.search_space={{{FRACTION}: {{type: float, low: 0.05, high: 0.95}}}}",
              f"+quick_objective.fail_when={{{FRACTION}: [0.55, 0.75]}}",
              f"+quick_objective.nan_when={{{FRACTION}: [0.25, 0.35]}}",
              f"+quick_objective.metrics.quick_frac={{{FRACTION}: 0.375}}", "optimized_metric=quick_frac")
    study = load(storage)
    by_state = {s: [t for t in study.trials if t.state == s] for s in (TrialState.COMPLETE, TrialState.FAIL)}
    assert len(study.trials) == 14 and by_state[TrialState.COMPLETE] and by_state[TrialState.FAIL]
    for trial in study.trials:
        x = trial.params[FRACTION]
        reason = trial.user_attrs.get(FAIL_REASON, "")
        if x < 0.25 or x > 0.75:  # rejected before the job: the model config's own message
            assert trial.state == TrialState.FAIL and "invalid point" in reason and "top_k" in reason, reason
        elif 0.55 <= x <= 0.75:
            assert trial.state == TrialState.FAIL and "QuickObjectiveFailure" in reason, reason
        elif 0.25 <= x <= 0.35:
            assert trial.state == TrialState.FAIL and "not finite" in reason, reason
        else:
            assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx((x - 0.375) ** 2)


@pytest.mark.slow
def test_bad_input_fails_before_the_study_with_the_culprit(tmp_path):
    # a split range where no point is valid
    result = run_sweep(tmp_path, f"hydra.sweeper.search_space={{{FRACTION}: {{type: float, low: 0.85, high: 0.95}}}}",
                       f"hydra.sweeper.storage=sqlite:///{tmp_path / 'a.db'}", expect_ok=False)
    assert result.returncode != 0 and "impossible" in result.stderr and "audio_expert_fraction" in result.stderr
    assert not (tmp_path / "a.db").exists() or not optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'a.db'}")
    # a key the config lacks
    result = run_sweep(tmp_path, "++hydra.sweeper.search_space={model.no_such_field: {type: int, low: 1, high: 2}}",
                       expect_ok=False)
    assert result.returncode != 0 and "no_such_field" in result.stderr and "does not compose" in result.stderr
    # an unreachable storage
    result = run_sweep(tmp_path, "hydra.sweeper.storage=sqlite:////proc/no_such_dir/study.db", expect_ok=False)
    assert result.returncode != 0 and "hydra.sweeper.storage" in result.stderr and "could not be opened" in result.stderr
    # a sweep override where a search space is expected
    result = run_sweep(tmp_path, "seed=1,2", expect_ok=False)
    assert result.returncode != 0 and "search_space" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "journal"])
def test_sigkill_mid_trial_then_resume_keeps_finished_trials(tmp_path, backend):
    storage = (f"sqlite:///{tmp_path / 'study.db'}" if backend == "sqlite" else f"journal:///{tmp_path / 'study.log'}")
    overrides = ["hydra.sweeper.n_trials=5", f"hydra.sweeper.storage={storage}", "quick_objective.sleep_s=0.4",
                 "quick_objective.steps=5", "hydra.sweeper.sampler={name: random, seed: 0}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(sweep_cmd(tmp_path, *overrides), cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill once two trials are done and the third runs with its parameters
            time.sleep(0.3)
            try:
                trials = load(storage).trials
            except Exception:  # noqa: BLE001 - the study may not exist yet
                continue
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            running = [t for t in trials if t.state == TrialState.RUNNING]
            # (a trial killed between its creation and its parameters' sampling has none to retry with)
            if len(done) >= 2 and running and running[0].params.keys() == done[0].params.keys():
                break
        else:
            pytest.fail("the sweep never reached two finished trials")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = load(storage).trials
    finished_before = {t.number: t.value for t in killed if t.state == TrialState.COMPLETE}
    interrupted = [t for t in killed if t.state == TrialState.RUNNING]
    assert len(interrupted) == 1

    run_sweep(tmp_path, *overrides, name="resumed")
    trials = load(storage).trials
    for number, value in finished_before.items():  # kept as they were
        assert trials[number].state == TrialState.COMPLETE and trials[number].value == value
    lost = trials[interrupted[0].number]
    assert lost.state == TrialState.FAIL and lost.system_attrs.get(INTERRUPTED_ATTR)
    assert "interrupted" in lost.user_attrs[FAIL_REASON]
    retry = [t for t in trials if t.user_attrs.get(REQUEUED_FROM) == lost.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == lost.params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 5  # the budget, the lost trial not counted
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


@pytest.mark.slow
def test_n_jobs_and_a_second_process_share_the_storage_without_duplicates(tmp_path):
    storage = f"journal:///{tmp_path / 'study.log'}"
    overrides = ["hydra.sweeper.n_trials=10", f"hydra.sweeper.storage={storage}", "quick_objective.sleep_s=0.2",
                 "hydra.sweeper.sampler={name: random, seed: 1}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(sweep_cmd(tmp_path, *overrides, "hydra.sweeper.n_jobs=2", name="a"), cwd=REPO_ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
             # another machine: its own sampler seed (two workers with one seed propose the same points)
             subprocess.Popen(sweep_cmd(tmp_path, *overrides, "hydra.sweeper.sampler.seed=2", name="b"),
                              cwd=REPO_ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
    trials = load(storage).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # each worker checks the budget before asking: at most one extra trial per concurrent worker
    assert 10 <= len(complete) <= 12 and len(complete) == len(trials)
    job_dirs = [p for name in ("a", "b") for p in (tmp_path / name).iterdir() if (p / "metrics.json").is_file()]
    assert len(job_dirs) == len(trials)  # every trial ran exactly once
    assert sorted(int(p.name) for p in job_dirs) == sorted(t.number for t in trials)
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == len(params), "workers proposed the same point"
    pids = {t.system_attrs["most_sweeper:worker"]["pid"] for t in trials}
    assert len(pids) >= 2, "the trials were not shared between processes"


@pytest.mark.slow
def test_multi_objective_sweep(tmp_path):
    storage = f"journal:///{tmp_path / 'study.log'}"
    run_sweep(tmp_path, "hydra.sweeper.n_trials=8", f"hydra.sweeper.storage={storage}",
              "hydra.sweeper.directions=[minimize,minimize]", "optimized_metric=[quick/a,quick/b]",
              "++quick_objective.metrics={quick/a: {model.audio_expert_fraction: 0.3}, "
              "quick/b: {model.audio_expert_fraction: 0.7}}")
    study = load(storage)
    assert len(study.directions) == 2 and len(study.trials) == 8
    for trial in study.trials:
        x = trial.params[FRACTION]
        assert trial.values == pytest.approx([(x - 0.3) ** 2, (x - 0.7) ** 2])
    def dominated(t):  # by another trial: no worse in both objectives, better in one (the oracle)
        return any(all(o <= v for o, v in zip(u.values, t.values)) and u.values != t.values for u in study.trials)

    assert {t.number for t in study.best_trials} == {t.number for t in study.trials if not dominated(t)}


@pytest.mark.slow
def test_median_pruner_marks_trials_pruned(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    run_sweep(tmp_path, "hydra.sweeper.n_trials=12", f"hydra.sweeper.storage={storage}", "quick_objective.steps=4",
              "hydra.sweeper.sampler={name: random, seed: 2}",
              "++hydra.sweeper.pruner={name: median, kwargs: {n_startup_trials: 3, n_warmup_steps: 0}}")
    study = load(storage)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert pruned and complete
    for trial in pruned:  # stopped at a reported step, worse than the median of the earlier trials there
        step = max(trial.intermediate_values)
        assert step < 4 and "pruned at step" in trial.user_attrs["pruned_reason"]
        earlier = [t.intermediate_values[step] for t in study.trials
                   if t.number < trial.number and step in t.intermediate_values]
        assert trial.intermediate_values[step] > sorted(earlier)[(len(earlier) - 1) // 2]


def test_plugin_is_discovered_by_hydra_scan_and_by_explicit_registration(tmp_path):
    code = ("from hydra.core.plugins import Plugins; "
            "print('hydra_plugins.most_optuna_sweeper.sweeper.MostOptunaSweeper' in Plugins.instance().class_name_to_class)")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # a fresh process outside the repository folder
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "True", out.stderr
    from most_lightning.experiments.plugin_registration import register_sweeper_plugin

    assert register_sweeper_plugin()


# ---- the Lightning callback --------------------------------------------------------------------------------------
class _Curve:
    """A LightningModule whose validation metric is a known curve of the global step."""

    @staticmethod
    def make():
        import lightning as L
        import torch

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))

            def training_step(self, batch, batch_idx):
                return (self.w - 1.0).pow(2).sum() + 0 * batch.sum()

            def validation_step(self, batch, batch_idx):
                self.log("val/nll", 10.0 / (1 + self.global_step))

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Module()


@pytest.mark.parametrize("prune", [False, True])
def test_pruning_callback_reports_each_step_based_validation(prune, tmp_path):
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from most_lightning.experiments.trial_link import register_in_process
    from most_lightning.lit.pruning import OptunaPruning, pruning_message

    pruner = optuna.pruners.ThresholdPruner(upper=0.0 if prune else 1e9)  # prune anything / nothing
    study = optuna.create_study(study_name=f"cb_{prune}", pruner=pruner)
    register_in_process(study, study._storage)
    trial = study.ask()
    callback = OptunaPruning("val/nll", {"study_name": study.study_name, "storage": None,
                                         "trial_id": trial._trial_id, "number": trial.number})
    data = DataLoader(torch.zeros(64, 1), batch_size=4)
    trainer = L.Trainer(max_steps=10, val_check_interval=2, limit_val_batches=1, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(_Curve.make(), data, data)
    reported = study._storage.get_trial(trial._trial_id).intermediate_values
    if prune:
        assert reported == {2: pytest.approx(10.0 / 3)} and trainer.global_step == 2
        assert callback.pruned_at == 2 and "pruned at step 2" in pruning_message([callback])
    else:
        assert sorted(reported) == [2, 4, 6, 8, 10] and trainer.global_step == 10
        assert all(v == pytest.approx(10.0 / (1 + s)) for s, v in reported.items())
        assert pruning_message([callback]) is None


def test_pruning_callback_names_a_missing_monitor(tmp_path):
    from most_lightning.experiments.trial_link import register_in_process
    from most_lightning.lit.pruning import OptunaPruning

    study = optuna.create_study(study_name="cb_missing")
    register_in_process(study, study._storage)
    trial = study.ask()
    callback = OptunaPruning("val/no_such", {"study_name": "cb_missing", "storage": None,
                                             "trial_id": trial._trial_id, "number": 0})

    class Trainer:
        sanity_checking, is_global_zero, callback_metrics, global_step = False, True, {"val/nll": 1.0}, 3

    with pytest.raises(KeyError, match="val/no_such.*val/nll"):
        callback.on_validation_end(Trainer(), None)


def test_dead_worker_detection_by_process_and_heartbeat():
    import socket
    from datetime import datetime
    from types import SimpleNamespace

    from most_lightning.experiments.sweep_loop import HEARTBEAT_ATTR, WORKER_ATTR, is_dead

    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    now = time.time()

    def trial(host, pid, beat):
        attrs = {WORKER_ATTR: {"host": host, "pid": pid}, HEARTBEAT_ATTR: beat}
        return SimpleNamespace(system_attrs=attrs, datetime_start=datetime.fromtimestamp(now - 1000))

    here = socket.gethostname()
    assert is_dead(trial(here, dead_pid.pid, now), now, grace_period=60)          # process gone: at once
    assert not is_dead(trial(here, os.getpid(), now - 1e6), now, grace_period=60)  # alive here: stale beat is fine
    assert is_dead(trial("elsewhere", 1, now - 61), now, grace_period=60)         # other host: heartbeat too old
    assert not is_dead(trial("elsewhere", 1, now - 5), now, grace_period=60)


@pytest.mark.parametrize("option", sorted(p.stem for p in (REPO_ROOT / "conf" / "hparams_search").glob("*.yaml")))
def test_every_hparams_search_file_composes_with_a_valid_space(option, tmp_path):
    from conftest import compose_run_config
    from omegaconf import OmegaConf

    from most_lightning.experiments.optuna_setup import check_directions, make_pruner, make_sampler

    cfg = compose_run_config([f"hparams_search={option}"], tmp_path)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("MostOptunaSweeper")
    space = parse_search_space(OmegaConf.to_container(sweeper.search_space))
    assert space
    for param in space:  # every searched key exists in the composed config
        assert OmegaConf.select(cfg, param.key.lstrip("+")) is not None, param.key
    directions = check_directions(list(sweeper.directions))
    names = cfg.optimized_metric if OmegaConf.is_list(cfg.optimized_metric) else [cfg.optimized_metric]
    assert len(names) == len(directions)
    make_sampler(OmegaConf.to_container(sweeper.sampler), len(directions))
    make_pruner(OmegaConf.to_container(sweeper.pruner), len(directions))


@pytest.mark.slow
def test_repeated_points_reuse_the_finished_result(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    conf = tmp_path / "conf" / "hparams_search"
    conf.mkdir(parents=True)  # a search file of one's own, next to the repository's (--config-dir)
    (conf / "two_points.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/sweeper: most_optuna\n"
        "optimized_metric: quick_frac\n"
        f"quick_objective:\n  metrics:\n    quick_frac: {{{FRACTION}: 0.375}}\n  steps: 0\n"
        "hydra:\n  sweeper:\n    study_name: quick\n    n_trials: 6\n    sampler: {name: random, seed: 0}\n"
        f"    search_space:\n      {FRACTION}: {{type: categorical, choices: [0.25, 0.5]}}\n")
    cmd = [sys.executable, "run.py", "-m", "-cd", str(tmp_path / "conf"), "hparams_search=two_points",
           f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           f"hydra.sweeper.storage={storage}"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    trials = load(storage).trials
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    ran = [t for t in trials if "duplicate_of" not in t.user_attrs]
    assert sorted(t.params[FRACTION] for t in ran) == [0.25, 0.5]  # each point ran once
    job_dirs = [p for p in (tmp_path / "sweep").iterdir() if (p / "metrics.json").is_file()]
    assert len(job_dirs) == 2
    for trial in trials:
        assert trial.value == pytest.approx((trial.params[FRACTION] - 0.375) ** 2)
