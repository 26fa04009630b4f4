"""Train a MoST model, test it on the held-out split, write metrics.json into the run directory.

    python run.py                                   # tiny MoST on the demo corpus, CPU, a couple of minutes
    python run.py router=vanilla model.n_shared_experts=0
    python run.py -m router=vanilla,modality_aware model.n_shared_experts=0,2
    python run.py experiment=demo_long logger=many
    python run.py audio=continuous                  # MoST-C: frozen encoder features instead of input units
    python run.py --cfg job                         # print the composed config
    python run.py mode=eval ckpt_path=<run>/checkpoints/last.ckpt eval=default task_name=eval   # eval suite

Returns cfg.optimized_metric so Hydra sweepers can optimise it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from most_lightning.config_nodes import register_config_nodes
from most_lightning.experiments.provenance import job_config

# paths.root_dir defaults to this folder, wherever run.py is started from
os.environ.setdefault("MOST_LIGHTNING_ROOT", str(Path(__file__).resolve().parent))
register_config_nodes()  # router/base and lit/base, on which conf/router and conf/lit build


# printed at the end of testing (everything is in metrics.json)
HEADLINE_METRICS = ("test/asr_wer", "test/asr_cer", "test/asr_mismatched_wer", "test/tts_unit_acc",
                    "test/tts_unit_nll", "test/text_nll", "test/expert_load/audio_to_audio_group",
                    "test/expert_load/load_max_over_mean_text", "test/expert_load/load_max_over_mean_audio")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test as the config says; returns every scalar metric (also written to metrics.json)."""
    # Heavy imports here so that `python run.py --help` / `--cfg job` answer at once, and a bad setting fails
    # before Lightning is even imported or any data is prepared.
    resume_from = resume_checkpoint(cfg)  # a URL or a missing checkpoint stops here, before any work
    check_settings(cfg)
    strategy, batch_plan = strategy_for_run(cfg, resume_from)  # bad launch, precision or global batch fail here

    import lightning as L
    from lightning.pytorch.utilities import rank_zero_only

    from most_lightning.experiments.provenance import write_run_records
    from most_lightning.lit.checkpoint import RecordDataSettings, check_resume_checkpoint
    from most_lightning.lit.pruning import pruning_message
    from most_lightning.lit.run_summary import print_run_summary
    from most_lightning.lit.runtime import (
        best_checkpoint_metrics,
        checkpoint_for_test,
        instantiate_callbacks,
        instantiate_loggers,
        route_lightning_logs_through_root,
        scalar_metrics,
        write_json,
    )

    route_lightning_logs_through_root()
    log_info = rank_zero_only(logging.getLogger("most_lightning.run").info)

    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    log_info(f"datamodule <{cfg.data._target_}>")
    audio = cfg.get("audio")  # conf/audio: the same front end for the data side and the model
    datamodule = hydra.utils.instantiate(cfg.data, audio=audio)
    datamodule.prepare_data()  # builds and caches the corpus + tokenizer on the first run
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer

    # not recursive: the router node's _target_ names the router class, which the module builds itself
    module = hydra.utils.instantiate(
        cfg.lit, model=cfg.model, router=cfg.router, vocab_size=tokenizer.vocab_size, audio=audio,
        tokenizer=tokenizer, _convert_="partial", _recursive_=False
    )
    n_params = sum(p.numel() for p in module.model.parameters())
    log_info(f"model: {n_params / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size}, "
                   f"router {module.model_config.router.name}")

    loggers = instantiate_loggers(cfg.get("logger"))
    callbacks = instantiate_callbacks(cfg.get("callbacks"), have_loggers=bool(loggers))
    callbacks.append(RecordDataSettings(cfg.data))  # so that mode=eval ckpt_path=... evaluates on the same data
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                 strategy=strategy, accumulate_grad_batches=batch_plan.accumulate)
    for logger in loggers:
        logger.log_hyperparams({"run": OmegaConf.to_container(job_config(cfg), resolve=True),
                                "model/n_params": n_params})

    metrics: dict[str, float] = {"model/n_params": float(n_params)}
    if cfg.get("train", True):
        if resume_from is not None and Path(resume_from).exists():  # the reader's checks, before any work
            check_resume_checkpoint(module, resume_from)
        # weights_only=True whatever the environment says: a checkpoint is data, never code
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        metrics |= scalar_metrics(trainer.callback_metrics) | best_checkpoint_metrics(trainer)
        pruned = pruning_message(callbacks)  # an Optuna pruner stopped the fit: no test, the trial is PRUNED
        if pruned is not None:
            if trainer.is_global_zero:
                write_run_records(output_dir, cfg, metrics)
            import optuna

            raise optuna.TrialPruned(pruned)
    if cfg.get("test", True):
        if cfg.get("train", True):
            ckpt = checkpoint_for_test(trainer, cfg.get("test_weights", "best"))
        else:  # test only: the weights given by ckpt_path (or the freshly initialised model)
            ckpt = resume_from
        log_info(f"testing with {ckpt or 'the weights in memory'}")
        loaders = make_test_loaders(datamodule, cfg.get("test_asr_mismatched", False))
        # verbose=False: Lightning would print the same epoch-level table once per test loader
        trainer.test(module, dataloaders=loaders, ckpt_path=ckpt, verbose=False, weights_only=True)
        metrics |= scalar_metrics(trainer.callback_metrics)
        log_info("test: " + ", ".join(
            f"{name.removeprefix('test/')} {metrics[name]:.4g}" for name in HEADLINE_METRICS if name in metrics))

    metrics |= skip_report(datamodule, output_dir, trainer.is_global_zero)
    if cfg.get("eval_after_test") and trainer.is_global_zero:  # e.g. TTS through a vocoder: WER and stop rate
        from most_lightning.eval.driver import evaluate_after_test

        tested = ckpt if cfg.get("test", True) else None
        metrics |= evaluate_after_test(cfg, module, datamodule, tested)
    if trainer.is_global_zero:
        # config_resolved.yaml (.hydra/config.yaml keeps the interpolations), metrics.json, provenance.json (git)
        write_run_records(output_dir, cfg, metrics)
        if module.asr_examples:
            write_json(output_dir / "asr_examples.json", module.asr_examples)
        log_info(f"metrics written to {output_dir / 'metrics.json'}")
        print_run_summary(metrics)
    return metrics


def strategy_for_run(cfg: DictConfig, resume_from: str | None) -> tuple[Any, Any]:
    """The `strategy` group -> (Trainer strategy, batch plan); checks launch, precision and global batch, and how
    a sharded checkpoint to resume from (``resume_from``) is read."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from most_lightning.lit.strategies import build_strategy

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return build_strategy(cfg.get("strategy"), cfg.trainer, cfg.get("data"), multirun=multirun,
                          ckpt_path=resume_from if cfg.get("train", True) else None,
                          audio=cfg.get("audio"))


def check_settings(cfg: DictConfig) -> None:
    """Every setting checked before any work, each error naming its field and what it allows: the model/router
    groups (vocab_size: the preset's for now; model.init: a bad pretrained dir or an impossible expert layout,
    from config.json + headers), the data group (batch sizes, token budgets, lengths, weights, sources) and the
    eval tasks to run after the test (each enabled in the eval suite)."""
    from most_lightning.data.settings_check import check_data_config
    from most_lightning.model.checkpoint.init import resolve_model_init
    from most_lightning.model.config_groups import build_model_config

    model_config = build_model_config(resolve_model_init(OmegaConf.to_container(cfg.model, resolve=True), None)[0],
                                      cfg.router, vocab_size=None)
    check_data_config(cfg.data, max_positions=model_config.max_position_embeddings)
    after = cfg.get("eval_after_test")
    if after:
        if not OmegaConf.is_list(after) or not all(isinstance(name, str) for name in after):
            raise ValueError(f"eval_after_test={after!r}: must be a list of eval task names, e.g. [tts]")
        from most_lightning.eval.driver import suite_tasks

        suite_tasks(cfg.eval, list(after))  # each one enabled in the eval suite


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The local checkpoint to resume (or test) from: ckpt_path, or resume=<run dir>'s last.ckpt; a URL or a
    missing file stops here, before any work (most_lightning.lit.resume)."""
    from most_lightning.lit.resume import checkpoint_to_resume

    return checkpoint_to_resume(cfg)


def skip_report(datamodule: Any, output_dir: Path, write: bool) -> dict[str, float]:
    """Every bad input the data skipped (all ranks) -> <run dir>/skipped.tsv; returns data/n_skipped[/<kind>]."""
    ledger = list(getattr(datamodule, "skip_ledger", []))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, ledger)
        ledger = [row for part in parts for row in part]
    return datamodule.write_skip_report(output_dir, ledger) if write else {}


def continue_killed_run(argv: list[str]) -> list[str]:
    """`ckpt_path=<run>/checkpoints/...` or `resume=<run>`: continue in that run directory, with its overrides
    (most_lightning.lit.resume.resume_argv); other command lines pass unchanged."""
    from most_lightning.lit.resume import resume_argv

    try:
        return argv[:1] + resume_argv(argv[1:])
    except (ValueError, FileNotFoundError) as err:  # a URL, or a run directory without last.ckpt
        raise SystemExit(f"error: {err}") from None


def make_test_loaders(datamodule: Any, add_mismatched_asr: bool) -> list:
    """The datamodule's test loaders ([0] ASR generation, [1] teacher-forced TTS + text), plus, if asked, an ASR
    loader whose audio comes from other sentences (the text-prior baseline; its batches are flagged
    ``mismatched``, which is how the module scores them apart)."""
    loaders = list(datamodule.test_dataloader())
    if add_mismatched_asr:
        loaders.append(datamodule.asr_generation_dataloader("test", mismatched=True,
                                                              limit=datamodule.evaluation.test_limit))
    return loaders


def label_router_by_target(cfg: DictConfig) -> None:
    """`router=<file> router._target_=<class>`: name the router after the class in every saved config."""
    if cfg.get("router") is not None and cfg.router.get("_target_") is not None:
        from most_lightning.model.router import labelled_router_node

        with open_dict(cfg):
            cfg.router = labelled_router_node(cfg.router)


@hydra.main(version_base="1.3", config_path="conf", config_name="run")
def main(cfg: DictConfig) -> Any:
    from most_lightning.lit.runtime import quiet_known_third_party_noise, run_objective

    quiet_known_third_party_noise()
    label_router_by_target(cfg)
    mode = cfg.get("mode", "train")
    names = cfg.get("optimized_metric")
    if cfg.get("quick_objective"):  # sweep tests: a known function of the overrides instead of training
        from most_lightning.experiments.quick_objective import run_quick_objective

        metrics = run_quick_objective(cfg)
    elif mode == "eval":  # model, router, audio and data settings from the checkpoint, overrides on top
        from most_lightning.eval.driver import run_eval

        metrics = run_eval(cfg)
        if not OmegaConf.is_list(names) and names not in metrics:  # val/nll is a training metric: nothing to return
            return None
    elif mode == "vocoder":  # experiment=vocoder: the unit HiFi-GAN
        from most_lightning.lit.vocoder import train_vocoder

        metrics = train_vocoder(cfg)
    elif mode == "train":
        metrics = train(cfg)
    else:
        raise ValueError(f"mode={mode!r}: allowed values are 'train', 'eval' and 'vocoder'")
    # a missing objective is NaN with a warning: the multirun goes on, a sweeper records the trial FAILED
    return run_objective(metrics, names)


if __name__ == "__main__":
    # our Hydra sweeper (hydra/sweeper=most_optuna) is found by Hydra's scan of the hydra_plugins namespace; register
    # it explicitly too, for installs where that scan cannot list it (setuptools' PEP 660 editable finder)
    from most_lightning.experiments.plugin_registration import register_sweeper_plugin

    register_sweeper_plugin()
    sys.argv = continue_killed_run(sys.argv)
    # torchrun / srun started this process: every rank writes into one run dir (see lit/launch.py)
    from most_lightning.lit.launch import close_process_group, exit_launched_rank, pin_run_dir_for_launched_ranks

    pin_run_dir_for_launched_ranks(sys.argv)
    try:
        main()
    finally:
        close_process_group()
    exit_launched_rank()
