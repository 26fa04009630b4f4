"""Ablation experiments (conf/experiment/*_ablation.yaml): every cell of each grid composes into a valid config,
one cell trains end to end and leaves its run records; the summariser on a synthetic multirun directory."""

from __future__ import annotations

import csv
import itertools
import json
import statistics
import subprocess
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import FAST_OVERRIDES, REPO_ROOT, compose_run_config
from most_lightning.model.config_groups import build_model_config

ABLATIONS = ["router_ablation", "router_ablation_lc", "split_ablation", "init_ablation"]


def grid(experiment: str, tmp_path: Path) -> list[list[str]]:
    """The cells the basic sweeper would launch for `-m experiment=<name>` (hydra.sweeper.params)."""
    cfg = compose_run_config([f"experiment={experiment}"], tmp_path)
    params = cfg.hydra.sweeper.params
    assert "seed" in params, f"{experiment}: seeds must be a sweep axis"
    axes = []
    for override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]):
        key = override.get_key_element()
        axes.append([f"{key}={v}" for v in override.sweep_string_iterator()])
    return [list(cell) for cell in itertools.product(*axes)]


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
@pytest.mark.parametrize("experiment", ABLATIONS)
def test_every_cell_composes_into_a_valid_config(experiment, tmp_path):
    cells = grid(experiment, tmp_path)
    assert len(cells) >= 6
    for cell in cells:
        cfg = compose_run_config([f"experiment={experiment}", *cell], tmp_path)
        for override in cell:
            key, value = override.split("=")
            if key == "router":
                assert cfg.hydra.runtime.choices.router == value
            elif key == "model/init":
                assert cfg.hydra.runtime.choices["model/init"] == value
            else:
                assert str(OmegaConf.select(cfg, key)) == value, (key, value)
        assert cfg.task_name == experiment
        if experiment == "init_ablation":
            init = cfg.model.init
            chosen = cfg.hydra.runtime.choices["model/init"]
            assert (init.from_pretrained is not None) == (chosen == "moe_import")
            assert (init.upcycle_from is not None) == (chosen == "dense_upcycle")
            continue  # model.init is read by the checkpoint importer (see test_init_ablation_cell_trains)
        build_model_config(cfg.model, cfg.router, vocab_size=100)


@pytest.mark.slow
def test_one_split_cell_trains_and_records_config_commit_metrics(cfg_fast, tmp_path, shared_data_dir):
    from run import train

    cfg = compose_run_config(["experiment=split_ablation", "model.audio_expert_fraction=0.25", "seed=2",
                              *FAST_OVERRIDES, f"paths.data_dir={shared_data_dir}"], tmp_path)
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    saved = OmegaConf.load(run_dir / "config_resolved.yaml")
    assert saved.model.audio_expert_fraction == 0.25 and saved.seed == 2 and saved.task_name == "split_ablation"
    assert json.loads((run_dir / "metrics.json").read_text())["val/nll"] == pytest.approx(metrics["val/nll"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert json.loads((run_dir / "provenance.json").read_text())["git"]["commit"] == head
    # 8 experts, fraction 0.25: experts 6, 7 form the audio group, and modality-aware routing keeps audio there
    assert metrics["test/expert_load/audio_to_audio_group"] == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize("init", ["moe_import", "dense_upcycle"])
def test_init_ablation_cell_trains(init, tmp_path, shared_data_dir, single_thread):
    """One cell per initialisation from tiny checkpoints written locally in the real HF layouts."""
    from hf_checkpoints import deepseek_model, llama_model, save_hf  # tests/ helpers of the importer
    from run import train

    moe = save_hf(deepseek_model(), tmp_path / "deepseek_v2")
    dense = save_hf(llama_model(), tmp_path / "llama")
    cfg = compose_run_config(["experiment=init_ablation", f"model/init={init}", "seed=1", *FAST_OVERRIDES,
                              f"paths.data_dir={shared_data_dir}", f"init_ablation.moe_checkpoint={moe}",
                              f"init_ablation.dense_checkpoint={dense}"], tmp_path)
    metrics = train(cfg)
    saved = OmegaConf.load(Path(cfg.paths.output_dir) / "config_resolved.yaml")
    assert saved.model.init.from_pretrained == (str(moe) if init == "moe_import" else None)
    assert saved.model.init.upcycle_from == (str(dense) if init == "dense_upcycle" else None)
    assert metrics["val/nll"] == metrics["val/nll"] and metrics["val/nll"] < 50  # finite, trained


# ---- summariser ----------------------------------------------------------------------------------------------------
def write_job(root: Path, num: int, overrides: list[str], config: dict, metrics: dict | None) -> Path:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
    if metrics is not None:
        OmegaConf.save(OmegaConf.create(config), job / "config_resolved.yaml")
        (job / "metrics.json").write_text(json.dumps(metrics))
        (job / "provenance.json").write_text(json.dumps({"git": {"commit": "abc123", "dirty": False}}))
    return job


def test_summarizer_marks_failed_and_missing_runs(tmp_path):
    from most_lightning.experiments.summarize import main

    sweep = tmp_path / "multirun"
    sweep.mkdir()
    OmegaConf.save(OmegaConf.create({
        "hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                              "params": {"router": "vanilla,modality_aware"}},
                  "overrides": {"task": ["seed=1,2,3"]}}}), sweep / "multirun.yaml")
    values = {("vanilla", 1): 4.0, ("vanilla", 2): 4.5, ("vanilla", 3): 4.1, ("modality_aware", 1): 3.0,
              ("modality_aware", 2): 3.5}
    num = 0
    for (router, seed), nll in values.items():
        write_job(sweep, num, [f"router={router}", f"seed={seed}"],
                  {"router": {"name": router}, "seed": seed, "model": {"audio_expert_fraction": 0.5}},
                  {"val/nll": nll, "test/asr_wer": nll / 10})
        num += 1
    # modality_aware seed 3 crashed (no metrics.json); nothing is missing then... drop one job dir to make a gap
    write_job(sweep, num, ["router=modality_aware", "seed=3"],
              {"router": {"name": "modality_aware"}, "seed": 3}, None)
    (sweep / "2").rename(tmp_path / "lost")  # vanilla seed 3 never ran: missing

    out = tmp_path / "summary"
    main([str(sweep), "--metrics", "val/nll", "test/asr_wer", "--cell-keys", "router.name", "--out", str(out)])
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    statuses = sorted(r["status"] for r in rows)
    assert statuses == ["complete"] * 4 + ["failed", "missing"]
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["router.name"] == "modality_aware" and "metrics.json" in failed["reason"]
    missing = next(r for r in rows if r["status"] == "missing")
    assert set(missing["overrides"].split()) == {"router=vanilla", "seed=3"}
    assert all(r["git_commit"] == "abc123" for r in rows if r["status"] == "complete")

    table = (out / "summary.md").read_text()
    vanilla = statistics.fmean([4.0, 4.5]), statistics.stdev([4.0, 4.5])
    aware = statistics.fmean([3.0, 3.5]), statistics.stdev([3.0, 3.5])
    assert f"| vanilla | 2/0/0/1 | 1 2 | {vanilla[0]:.4g} ± {vanilla[1]:.4g} |" in table, table
    assert f"| modality_aware | 2/0/1/0 | 1 2 | {aware[0]:.4g} ± {aware[1]:.4g} |" in table, table
    assert "**failed**" in table and "**missing**" in table
    for name in ("cells_multirun.png", "runs.csv", "summary.md"):
        assert (out / name).stat().st_size > 0, name


def _eval_report(path: Path, checkpoint: Path, metrics: dict) -> None:
    path.mkdir(parents=True)
    (path / "eval_report.json").write_text(json.dumps({"suite": "tts", "checkpoint": {"path": str(checkpoint)},
                                                       "tasks": {"tts": {"metrics": metrics}}}))


def test_a_later_evaluation_of_a_jobs_own_checkpoint_fills_the_metrics_it_lacks(tmp_path):
    from most_lightning.experiments.summarize import main

    sweep = tmp_path / "multirun"
    job = write_job(sweep, 0, ["seed=1"], {"router": {"name": "vanilla"}, "seed": 1},
                    {"test/asr_wer": 0.3, "eval/tts/stop_rate": 0.5})
    other = write_job(sweep, 1, ["seed=2"], {"router": {"name": "vanilla"}, "seed": 2}, {"test/asr_wer": 0.4})
    for run in (job, other):
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    _eval_report(job / "tts_eval", job / "checkpoints" / "last.ckpt", {"wer_unit_mel": 0.65, "stop_rate": 0.99})
    # an evaluation stored in the job's folder but of another run's weights adds nothing
    _eval_report(other / "stray_eval", job / "checkpoints" / "last.ckpt", {"wer_unit_mel": 0.1})

    out = tmp_path / "summary"
    main([str(sweep), "--metrics", "test/asr_wer", "eval/tts/wer_unit_mel", "--cell-keys", "router.name",
          "--out", str(out)])
    with open(out / "runs.csv") as f:
        rows = {r["seed"]: r for r in csv.DictReader(f)}
    assert float(rows["1"]["eval/tts/wer_unit_mel"]) == 0.65
    assert float(rows["1"]["eval/tts/stop_rate"]) == 0.5  # the job's own metrics.json wins
    assert rows["1"]["later_evals"] == str(job / "tts_eval" / "eval_report.json")
    assert rows["2"]["eval/tts/wer_unit_mel"] == "" and rows["2"]["later_evals"] == ""

    _eval_report(job / "tts_eval_again", job / "checkpoints" / "last.ckpt", {"wer_unit_mel": 0.7})
    with pytest.raises(ValueError, match=r"eval/tts/wer_unit_mel .* two later evaluations"):
        main([str(sweep), "--out", str(out)])


def test_a_runs_csv_of_an_earlier_summary_joins_new_runs_and_a_folder_given_again_replaces_its_row(tmp_path):
    """A study finished on another machine: its first cells survive only as the runs.csv of their summary."""
    from most_lightning.experiments.summarize import main

    def cell(root: Path, shared: int, values: dict) -> Path:
        for num, ((router, seed), wer) in enumerate(values.items()):
            write_job(root, num, [f"router={router}", f"seed={seed}"],
                      {"router": {"name": router}, "seed": seed, "model": {"n_shared_experts": shared, "flag": True}},
                      {"test/asr_wer": wer, "eval/tts/stop_rate": 1.0})
        return root

    first = cell(tmp_path / "first", 1, {("vanilla", 1): 0.30, ("vanilla", 2): 0.34})
    keys = ["--cell-keys", "router.name", "model.n_shared_experts", "--metrics", "test/asr_wer"]
    main([str(first), *keys, "--out", str(tmp_path / "earlier")])
    second = cell(tmp_path / "second", 0, {("vanilla", 1): 0.40, ("vanilla", 2): 0.50})

    out = tmp_path / "joined"
    main([str(tmp_path / "earlier" / "runs.csv"), str(second), *keys, "--out", str(out)])
    with open(out / "runs.csv") as f:
        rows = {(r["model.n_shared_experts"], r["seed"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == [("0", "1"), ("0", "2"), ("1", "1"), ("1", "2")]
    assert float(rows[("1", "2")]["test/asr_wer"]) == 0.34 and rows[("1", "2")]["config.model.flag"] == "True"
    assert rows[("1", "1")]["git_commit"] == "abc123" and rows[("1", "1")]["run_dir"] == str(first / "0")
    table = (out / "summary.md").read_text()
    earlier_cell = statistics.fmean([0.30, 0.34]), statistics.stdev([0.30, 0.34])
    assert f"| vanilla | 1 | 2/0/0/0 | 1 2 | {earlier_cell[0]:.4g} ± {earlier_cell[1]:.4g} |" in table, table
    diffs = [0.40 - 0.30, 0.50 - 0.34]  # paired by seed across the csv's runs and the new ones
    assert f"{statistics.fmean(diffs):.4g} ± {statistics.stdev(diffs):.4g}" in table, table

    main([str(tmp_path / "earlier" / "runs.csv"), str(first), *keys, "--out", str(tmp_path / "again")])
    with open(tmp_path / "again" / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 2  # the folders replaced their rows

    (tmp_path / "other.csv").write_text("name,value\nx,1\n")
    with pytest.raises(SystemExit, match="not a runs.csv written by this summariser"):
        main([str(tmp_path / "other.csv"), "--out", str(tmp_path / "bad")])


def _complete_runs(values):
    from most_lightning.experiments.summarize import Run

    return [Run(source="s", status="complete", config={"router.name": router, "seed": seed},
                metrics={"test/asr_wer": wer}) for (router, seed), wer in values.items()]


def test_paired_differences_by_hand():
    from most_lightning.experiments.summarize import paired_differences

    values = {("modality_aware", 1): 0.40, ("modality_aware", 2): 0.50, ("modality_aware", 3): 0.45,
              ("vanilla", 1): 0.50, ("vanilla", 2): 0.62, ("vanilla", 3): 0.53}
    (row,) = paired_differences(_complete_runs(values), ["router.name"], ["test/asr_wer"], "seed")
    diffs = [0.10, 0.12, 0.08]  # vanilla - modality_aware (the first cell is the reference), seed by seed
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    assert row["cell"] == "name=vanilla" and row["reference"] == "name=modality_aware" and row["n"] == 3
    assert row["mean"] == pytest.approx(mean) and row["std"] == pytest.approx(std)
    assert row["t"] == pytest.approx(mean / (std / 3 ** 0.5))
    assert row["exceeds_noise"]  # t = 8.66 > 4.303 (2 degrees of freedom)
    assert row["detectable"] == pytest.approx(4.303 * std / 3 ** 0.5)


def test_a_factorial_grid_compares_every_two_cells_that_differ_in_one_factor():
    from most_lightning.experiments.summarize import Run, paired_differences

    wer = {("modality_aware", 0): [0.40, 0.44], ("modality_aware", 1): [0.36, 0.35],
           ("vanilla", 0): [0.38, 0.39], ("vanilla", 1): [0.33, 0.34]}
    runs = [Run(source="s", status="complete", config={"router.name": router, "model.n_shared_experts": shared,
                                                       "seed": seed}, metrics={"test/asr_wer": values[seed - 1]})
            for (router, shared), values in wer.items() for seed in (1, 2)]
    rows = paired_differences(runs, ["router.name", "model.n_shared_experts"], ["test/asr_wer"], "seed")
    got = {(r["cell"], r["reference"]): r["mean"] for r in rows}
    # the router at each shared-expert count, the shared expert under each router; never both factors at once
    ma0, ma1 = "name=modality_aware, n_shared_experts=0", "name=modality_aware, n_shared_experts=1"
    va0, va1 = "name=vanilla, n_shared_experts=0", "name=vanilla, n_shared_experts=1"
    expected = {(ma1, ma0): (-0.04 - 0.09) / 2, (va0, ma0): (-0.02 - 0.05) / 2,
                (va1, ma1): (-0.03 - 0.01) / 2, (va1, va0): (-0.05 - 0.05) / 2}
    assert set(got) == set(expected)
    for pair, mean in expected.items():
        assert got[pair] == pytest.approx(mean), pair


def test_a_seed_list_that_does_not_divide_into_the_cells_is_an_error(tmp_path):
    from most_lightning.experiments.summarize import UnpairedSeedsError, paired_differences

    values = {("modality_aware", 1): 0.4, ("modality_aware", 2): 0.5, ("vanilla", 1): 0.5, ("vanilla", 3): 0.6}
    with pytest.raises(UnpairedSeedsError, match=r"does not divide into the study's cells.*"
                                                 r"name=modality_aware: \['1', '2'\]; name=vanilla: \['1', '3'\]"):
        paired_differences(_complete_runs(values), ["router.name"], ["test/asr_wer"], "seed")
    twice = _complete_runs({("vanilla", 1): 0.5}) * 2
    with pytest.raises(UnpairedSeedsError, match="more than once"):
        paired_differences(twice, ["router.name"], ["test/asr_wer"], "seed")


def test_router_ablation_lc_runs_the_learning_check_recipe(tmp_path):
    lc = compose_run_config(["experiment=router_ablation_lc"], tmp_path)
    check = compose_run_config(["experiment=demo_long_asr"], tmp_path)
    for key in ("data", "model", "lit", "trainer"):
        assert OmegaConf.to_container(lc[key]) == OmegaConf.to_container(check[key]), key
    cells = grid("router_ablation_lc", tmp_path)
    assert len(cells) == 12 and {c[1] for c in cells} == {"model.n_shared_experts=0", "model.n_shared_experts=1"}
