"""conf/strategy and lit/strategies.py without starting processes: what each config composes to, the
global-batch arithmetic, the start-up errors, the run-dir pinning for torchrun/srun ranks, the exact-zero
contribution of MoST-C's projection, and the optimizer groups the weight-decay policy asks for."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_run_config
from most_lightning.lit.launch import (
    LaunchError,
    close_process_group,
    pin_run_dir_for_launched_ranks,
    shared_run_id,
)
from most_lightning.lit.strategies import (
    BatchPlan,
    MOE_LEAF_MODULE,
    batch_plan,
    build_strategy,
    check_launch,
)

STRATEGIES = ["auto", "ddp", "ddp_spawn", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3"]


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE",
                 "SLURM_NNODES", "SLURM_PROCID", "SLURM_JOB_ID", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID", "MOST_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_config_composes_and_builds(name):
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    cfg = compose_run_config([f"strategy={name}", "trainer.devices=2", "data.batching=fixed"])
    assert cfg.strategy.name == name
    built, plan = build_strategy(cfg.strategy, cfg.trainer, cfg.data)
    assert plan == BatchPlan(cfg.data.batch_size, 2, 1, 1)
    if name == "auto":
        assert built == "auto"
    elif name.startswith("ddp"):
        assert type(built) is DDPStrategy
        assert built._start_method == ("spawn" if name == "ddp_spawn" else "popen")
    else:
        assert type(built).__name__ == "CPUDeepSpeedStrategy" and isinstance(built, DeepSpeedStrategy)
        assert cfg.trainer.precision == "bf16-mixed"
        zero = built.config["zero_optimization"]
        assert built.config["gradient_clipping"] == cfg.trainer.gradient_clip_val == 1.0
        assert built.config["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
        assert zero["stage"] == (3 if name.endswith("zero3") else 2)
        assert (zero.get("offload_optimizer") or {}).get("device") == ("cpu" if "offload" in name else None)
        if zero["stage"] == 3:
            assert zero["leaf_module"]["classes"] == [MOE_LEAF_MODULE]


def test_deepspeed_on_a_gpu_is_lightnings_own_strategy_with_the_clip_value():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    cfg = compose_run_config(["strategy=deepspeed_zero2", "trainer=gpu", "trainer.gradient_clip_val=0.5"])
    built, _ = build_strategy(cfg.strategy, cfg.trainer, cfg.data)
    assert type(built).__name__ == "MoSTDeepSpeedStrategy" and isinstance(built, DeepSpeedStrategy)
    assert built.config["gradient_clipping"] == 0.5


def test_cpu_deepspeed_strategy_is_announced(caplog):
    cfg = compose_run_config(["strategy=deepspeed_zero3", "data.batching=fixed"])
    with caplog.at_level("INFO", logger="most_lightning.strategy"):
        build_strategy(cfg.strategy, cfg.trainer, cfg.data)
    lines = [r.getMessage() for r in caplog.records if "CPUDeepSpeedStrategy" in r.getMessage()]
    assert len(lines) == 2 and "accelerator=cpu" in lines[0]  # the choice, then the strategy + batch summary
    assert "global batch 16 = micro-batch 16 x devices 1 x nodes 1 x accumulation 1" in lines[1]


def test_reference_run_composes_and_its_batch_arithmetic():
    """experiment=stage1_asr_tts asks for the paper's global batch of 512; 6 x 8 ranks cannot split it evenly."""
    cfg = compose_run_config(["experiment=stage1_asr_tts", "strategy=deepspeed_zero2_offload", "trainer.num_nodes=6",
                              "trainer.devices=8"])
    assert (cfg.strategy.name, cfg.trainer.num_nodes, cfg.trainer.devices) == ("deepspeed_zero2_offload", 6, 8)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.strategy.global_batch_size == 512 and cfg.data.batch_size == 16
    assert cfg.strategy.deepspeed.zero_optimization.offload_optimizer.device == "cpu"
    with pytest.raises(ValueError, match=r"strategy.global_batch_size=512 does not divide into data.batch_size=16 x "
                                         r"trainer.devices=8 x trainer.num_nodes=6 = 768.*or 768"):
        build_strategy(cfg.strategy, cfg.trainer, cfg.data)
    # 4 nodes x 8: 512 = 16 x 8 x 4 x 1; one device: 16 x 1 x 1 x 32 (the experiment's old accumulation)
    assert batch_plan(cfg.strategy, {"devices": 8, "num_nodes": 4}, cfg.data).accumulate == 1
    plan = batch_plan(cfg.strategy, {"devices": 1, "num_nodes": 1}, cfg.data)
    assert (plan.accumulate, plan.global_batch) == (32, 512)
    # 48 ranks: 512 has no factor 3, so no micro-batch divides it; 480 = 2 x 8 x 6 x 5 does
    with pytest.raises(ValueError, match="no data.batch_size divides it over 48 ranks"):
        batch_plan(cfg.strategy, {"devices": 8, "num_nodes": 6}, cfg.data)
    plan = batch_plan({"global_batch_size": 480}, {"devices": 8, "num_nodes": 6}, {"batch_size": 2})
    assert (plan.accumulate, plan.global_batch) == (5, 480)


def test_global_batch_that_does_not_divide_names_the_settings():
    with pytest.raises(ValueError, match=r"data.batch_size in \[1, 2, 4\] divides it"):
        batch_plan({"global_batch_size": 24}, {"devices": 3, "num_nodes": 1}, {"batch_size": 5})
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches=3 contradicts strategy.global_batch_size=64"):
        batch_plan({"global_batch_size": 64}, {"devices": 2, "accumulate_grad_batches": 3}, {"batch_size": 4})
    with pytest.raises(ValueError, match="needs fixed-size batches"):
        batch_plan({"global_batch_size": 64}, {"devices": 2}, {"batch_size": 4, "batching": "pack"})
    assert batch_plan({"global_batch_size": 64}, {"devices": 2}, {"batch_size": 4}).accumulate == 8


@pytest.mark.parametrize("precision, accelerator",
                         [("16-mixed", "cpu"), ("64-true", "gpu"), ("transformer-engine", "gpu")])
def test_deepspeed_with_a_precision_it_cannot_run(precision, accelerator):
    cfg = compose_run_config(["strategy=deepspeed_zero2", f"trainer.precision={precision}",
                              f"trainer.accelerator={accelerator}"])
    with pytest.raises(ValueError, match=f"trainer.precision='{precision}' cannot run with a DeepSpeed strategy.*"
                                         "allowed values"):
        build_strategy(cfg.strategy, cfg.trainer, cfg.data)


def test_two_ways_of_choosing_a_strategy_is_an_error():
    cfg = compose_run_config(["strategy=deepspeed_zero2", "trainer.strategy=ddp"])
    with pytest.raises(ValueError, match="trainer.strategy='ddp' and strategy='deepspeed_zero2' both choose"):
        build_strategy(cfg.strategy, cfg.trainer, cfg.data)
    cfg = compose_run_config(["trainer.strategy=ddp", "trainer.devices=2"])  # the plain Lightning name still works
    assert build_strategy(cfg.strategy, cfg.trainer, cfg.data)[0] == "ddp"


def test_multirun_with_a_relaunching_strategy_is_an_error():
    for kind, trainer in [("ddp", {"devices": 2}), ("deepspeed", {"devices": 1, "num_nodes": 2}),
                          ("auto", {"strategy": "ddp", "devices": 2})]:
        with pytest.raises(ValueError, match="inside a multirun .* re-enter the sweep"):
            check_launch(kind, trainer, multirun=True)
    check_launch("ddp_spawn", {"devices": 2}, multirun=True)  # forks: allowed
    check_launch("ddp", {"devices": 1}, multirun=True)  # one process: nothing to re-launch
    check_launch("ddp", {"devices": 2}, multirun=False)


def test_devices_larger_than_the_launched_processes_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"trainer.devices=4 but the launcher started 2 process\(es\) on this node"):
        check_launch("ddp", {"devices": 4, "num_nodes": 1}, multirun=False)
    with pytest.raises(ValueError, match="trainer.num_nodes=2 but the launcher started 2 processes, 2 per node"):
        check_launch("ddp", {"devices": 2, "num_nodes": 2}, multirun=False)
    check_launch("ddp", {"devices": 2, "num_nodes": 1}, multirun=False)
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    check_launch("deepspeed", {"devices": 8, "num_nodes": 2}, multirun=False)


# ------------------------------------------------------------------------------------------- run dir pinning
def launched_env(rank: int, **extra: str) -> dict[str, str]:
    return {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": str(rank), **extra}


def test_torchrun_ranks_pin_one_run_dir():
    argvs = [["run.py", "strategy=ddp"], ["run.py", "strategy=ddp"]]
    ids = [pin_run_dir_for_launched_ranks(argv, launched_env(r, TORCHELASTIC_RUN_ID="abc123"))
           for r, argv in enumerate(argvs)]
    assert ids == ["torchrun-abc123"] * 2
    assert argvs[0] == ["run.py", "strategy=ddp", "hydra.run.dir=${paths.log_dir}/${task_name}/runs/torchrun-abc123"]
    assert argvs[1] == argvs[0] + ["hydra.output_subdir=null", "hydra.job.name=run_rank1"]


def test_run_id_sources_in_order():
    assert shared_run_id(launched_env(0, MOST_RUN_ID="mine", SLURM_JOB_ID="7")) == "mine"
    assert shared_run_id(launched_env(0, SLURM_JOB_ID="7", SLURM_STEP_ID="0")) == "slurm-7.0"
    assert shared_run_id(launched_env(1, TORCHELASTIC_RUN_ID="none")).startswith("torchrun-")  # agent pid + start
    assert shared_run_id(launched_env(0, TORCHELASTIC_RUN_ID="none")) == shared_run_id(launched_env(1))
    with pytest.raises(LaunchError, match="MOST_RUN_ID"):  # two nodes, no id the ranks could share
        shared_run_id({"WORLD_SIZE": "4", "RANK": "0", "LOCAL_WORLD_SIZE": "2"})


def test_process_group_is_closed_before_interpreter_shutdown(tmp_path):
    """run.py closes the group itself: left to shutdown, gloo aborted about one finished rank in ten."""
    import torch.distributed as dist

    close_process_group()  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    close_process_group()
    assert not dist.is_initialized()


@pytest.mark.parametrize("world", [1, 2])
def test_a_finished_launched_rank_leaves_without_interpreter_finalisation(world):
    """Ranks of a launch leave through os._exit once their output is flushed, so no Gloo work freed during
    finalisation can abort them; a single process exits the normal way (its atexit handlers run)."""
    script = ("import atexit, logging, sys\n"
              "from most_lightning.lit.launch import exit_launched_rank\n"
              "atexit.register(lambda: print('finalised'))\n"
              "logging.basicConfig(stream=sys.stderr, level=logging.INFO)\n"
              "print('trained', end='')\n"
              "logging.getLogger('rank').info('logged')\n"
              "exit_launched_rank()\n")
    env = {**os.environ, "WORLD_SIZE": str(world), "RANK": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("trained") and "logged" in done.stderr  # unflushed output still comes out
    assert ("finalised" in done.stdout) == (world == 1)


def test_pinning_leaves_single_processes_and_explicit_dirs_alone_and_refuses_multirun():
    argv = ["run.py"]
    assert pin_run_dir_for_launched_ranks(argv, {}) is None and argv == ["run.py"]
    argv = ["run.py", "hydra.run.dir=/x"]
    assert pin_run_dir_for_launched_ranks(argv, launched_env(0, MOST_RUN_ID="a")) is None
    with pytest.raises(LaunchError, match="multirun"):
        pin_run_dir_for_launched_ranks(["run.py", "-m", "router=vanilla,modality_aware"], launched_env(0))


# ------------------------------------------------------------------------------------------- every parameter
def test_most_c_projection_adds_an_exact_zero_on_batches_without_audio():
    """Every trainable parameter gets a gradient on a text-only batch (MoST-C included), so the ranks of a
    ZeRO / DDP run always reduce the same set; the projection's gradient is exactly zero and the loss unchanged."""
    from tests.distributed_worker import build_module, make_batch

    module = build_module({"continuous": True})
    batch = make_batch(0, 0, "text", module)
    out = module(batch, compute_logits=False)
    out.loss.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert torch.equal(module.audio_input.proj.weight.grad, torch.zeros_like(module.audio_input.proj.weight))
    assert torch.equal(module.audio_input.proj.bias.grad, torch.zeros_like(module.audio_input.proj.bias))
    with torch.no_grad():  # the same loss as the plain path without the projection
        plain = module.model(batch["input_ids"], batch["modality"], attention_mask=batch["attention_mask"])
        embeds = module.model.embed(batch["input_ids"])
    assert torch.equal(module.audio_input.without_audio(embeds), embeds)
    from most_lightning.model.token_losses import shifted_token_losses

    assert torch.equal(shifted_token_losses(plain.logits, batch["labels"], batch["modality"]).mean(),
                       out.lm_loss.detach())


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
@pytest.mark.parametrize("router", ["modality_aware", "vanilla"])
def test_every_parameter_gets_a_gradient_on_a_speech_only_batch(router):
    from tests.distributed_worker import build_module, make_batch

    module = build_module({"continuous": True})
    if router != "modality_aware":
        from most_lightning.lit import MoSTLitModule

        module = MoSTLitModule(model=module.hparams.model, vocab_size=module.hparams.vocab_size,
                               router={"name": router},
                               audio=module.hparams.audio)
        module.model.fused_loss = False
    module(make_batch(0, 1, "speech", module), compute_logits=False).loss.backward()
    assert [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None] == []


# DeepSpeedCPUAdam compiles DeepSpeed's cpu_adam extension on first use (~40 s): the slow tier
@pytest.mark.parametrize("cpu_offload", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_experts_and_router_are_decayed_norms_are_not(cpu_offload):
    from most_lightning.lit.module import build_adamw
    from tests.distributed_worker import build_module

    module = build_module({})
    names = {id(p): n for n, p in module.named_parameters()}
    optimizer = build_adamw(module, {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
                            cpu_offload=cpu_offload)
    groups = {g["name"]: (g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups}
    decayed = groups["matrices"][1]
    assert groups["matrices"][0] == 0.1 and groups["vectors"][0] == 0.0
    assert {n for n in decayed if ".experts." in n} == {n for n in names.values() if ".experts." in n} != set()
    assert {n for n in decayed if n.endswith("mlp.gate.weight")} != set()
    assert not any("norm" in n for n in decayed)
    assert decayed | groups["vectors"][1] == {n for n, p in module.named_parameters() if p.requires_grad}
    assert type(optimizer).__name__ == ("DeepSpeedCPUAdam" if cpu_offload else "AdamW")


def test_csv_writer_copied_before_the_fit_keeps_the_fit_columns(tmp_path):
    """ddp_spawn's test workers get a copy of the logger made before the fit wrote metrics.csv. Lightning's
    writer then rewrites the file with the test's columns only and fails; ours keeps the union."""
    import copy

    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    from most_lightning.lit.csv_logger import CSVLogger

    for writer_of, ok in ((lambda d: CSVLogger(d, name="csv", version="").experiment, True),
                          (lambda d: ExperimentWriter(str(Path(d) / "csv")), False)):
        folder = tmp_path / str(ok)
        before_fit = writer_of(folder)
        fit_worker, test_worker = copy.deepcopy(before_fit), copy.deepcopy(before_fit)
        fit_worker.log_metrics({"train/loss": 1.5}, step=3)
        fit_worker.save()
        test_worker.log_metrics({"test/nll": 2.5}, step=4)
        if not ok:
            with pytest.raises(ValueError, match="dict contains fields not in fieldnames"):
                test_worker.save()
            continue
        test_worker.save()
        with open(folder / "csv" / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows == [{"step": "3", "train/loss": "1.5", "test/nll": ""},
                        {"step": "4", "train/loss": "", "test/nll": "2.5"}]


def test_zero3_with_most_c_is_refused_at_start_up():
    cfg = compose_run_config(["strategy=deepspeed_zero3", "audio=continuous"])
    with pytest.raises(ValueError, match="audio=continuous .* ZeRO-3"):
        build_strategy(cfg.strategy, cfg.trainer, cfg.data, audio=cfg.audio)
    cfg = compose_run_config(["strategy=deepspeed_zero2_offload", "audio=continuous"])
    build_strategy(cfg.strategy, cfg.trainer, cfg.data, audio=cfg.audio)
