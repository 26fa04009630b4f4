"""The one MoSTLitModule checkpoint reader (most_lightning.lit.checkpoint) and `mode=eval ckpt_path=X`, which
takes the model, router, audio and data settings from the checkpoint with command-line overrides on top."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST_OVERRIDES, compose_run_config
from most_lightning.lit import MoSTLitModule
from most_lightning.lit.checkpoint import (load_lit_module, read_checkpoint, saved_settings,
                                           with_checkpoint_settings)
from most_lightning.model.checkpoint import CheckpointError

MODEL = dict(preset="tiny", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, moe_intermediate_size=16,
             kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)


@pytest.fixture
def saved_module(tmp_path) -> tuple[MoSTLitModule, Path]:
    torch.manual_seed(0)
    module = MoSTLitModule(model=MODEL, router=dict(name="modality_aware", balance_loss_alpha=0.01), vocab_size=40)
    path = tmp_path / "last.ckpt"
    import lightning

    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 7,
                "pytorch-lightning_version": lightning.__version__, "most_data_settings": {"batch_size": 3}}, path)
    return module, path


def test_reader_equals_lightnings_load_from_checkpoint(saved_module):
    module, path = saved_module
    ours = load_lit_module(path)
    theirs = MoSTLitModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert not ours.training and ours.hparams == theirs.hparams == module.hparams
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
        assert torch.equal(module.state_dict()[key], value), key
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(ours.model(ids, torch.zeros_like(ids)).logits, theirs.model(ids, torch.zeros_like(ids)).logits)
    # an override replaces a saved hyperparameter, as in load_from_checkpoint(path, router=...)
    vanilla = load_lit_module(path, router=dict(name="vanilla"))
    assert vanilla.model_config.router.name == "vanilla" and ours.model_config.router.name == "modality_aware"


def test_missing_checkpoint_keys_are_named(tmp_path, saved_module):
    module, _ = saved_module
    hparams = dict(module.hparams)
    cases = {"weights_only.ckpt": ({"state_dict": module.state_dict()}, "it lacks hyper_parameters, "
                                   "hyper_parameters.model, hyper_parameters.router, hyper_parameters.vocab_size"),
             "no_router.ckpt": ({"state_dict": module.state_dict(),
                                 "hyper_parameters": {k: v for k, v in hparams.items() if k != "router"}},
                                "it lacks hyper_parameters.router \\("),
             "no_weights.ckpt": ({"hyper_parameters": hparams}, "it lacks state_dict \\(")}
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{name}: not a MoSTLitModule checkpoint: {message}"):
            read_checkpoint(tmp_path / name)
    # the export command line reads through the same reader: one line, exit code 2
    from most_lightning.model.checkpoint.__main__ import main

    assert main(["export", str(tmp_path / "no_router.ckpt"), str(tmp_path / "out")]) == 2


def test_weights_that_do_not_fit_name_the_keys(saved_module):
    _, path = saved_module
    with pytest.raises(CheckpointError, match=r"does not fit the model its settings describe: shape mismatches"):
        load_lit_module(path, model={**MODEL, "moe_intermediate_size": 24})


def test_resume_from_a_checkpoint_of_another_model_stops_before_training(saved_module, cfg_fast):
    """run.py resumes through the same reader's checks: not Lightning's strict-load traceback after start-up."""
    from run import train

    _, path = saved_module
    cfg_fast.ckpt_path = str(path)  # a MODEL-sized module; the run builds FAST_OVERRIDES' larger one
    message = r"last.ckpt does not fit the model its settings describe: missing keys .*shape mismatches .*resume with"
    with pytest.raises(CheckpointError, match=message):
        train(cfg_fast)
    assert not (Path(cfg_fast.paths.output_dir) / "metrics.json").exists()


def test_saved_settings_replace_the_composed_groups_and_overrides_apply_on_top(tmp_path):
    cfg = compose_run_config(["model.hidden_size=48", "model.kv_lora_rank=8", "~model.init", "router=vanilla",
                              "data.batch_size=5", "eval.batch_size=2"], tmp_path)
    saved = {"model": {**MODEL, "init": {"from_pretrained": None}}, "router": {"name": "modality_aware"},
             "audio": None, "data": {"_target_": "x.DataModule", "batch_size": 3, "max_length": 64}}
    merged = with_checkpoint_settings(cfg, saved, [str(o) for o in cfg.hydra.overrides.task])
    assert OmegaConf.to_container(merged.model) == {**MODEL, "hidden_size": 48}  # set, added and deleted on top
    assert merged.router.name == "vanilla"  # a group chosen on the command line is taken as composed
    assert merged.audio is None and cfg.audio is not None  # the checkpoint's (trained on units, no audio group)
    assert OmegaConf.to_container(merged.data) == {"_target_": "x.DataModule", "batch_size": 5, "max_length": 64}
    assert merged.eval.batch_size == 2 and cfg.model.hidden_size == 48  # other groups as composed; cfg unchanged
    assert saved_settings({"hyper_parameters": {"model": 1, "router": 2, "vocab_size": 3}}) == {"model": 1,
                                                                                                "router": 2}


EVAL = ["mode=eval", "eval=default", "eval.progress=false", "eval.tasks.asr.limit=3",
        "eval.tasks.asr.decodings=[greedy]", "eval.tasks.asr.max_new_tokens=8", "eval.tasks.text_ppl.limit=3"]


@pytest.mark.slow
def test_eval_takes_model_tokenizer_and_data_from_the_checkpoint(tmp_path, shared_data_dir, single_thread):
    """Train a tiny run; `mode=eval ckpt_path=...` with no training override evaluates the same model on the same
    data as the explicit-overrides way; an override given on the command line still applies."""
    from most_lightning.eval.checkpoint import CheckpointMismatchError
    from most_lightning.eval.driver import run_eval
    from run import train

    training = [*FAST_OVERRIDES, f"paths.data_dir={shared_data_dir}", "test=false", "router.balance_loss_alpha=0.01"]
    cfg = compose_run_config(training, tmp_path / "train")
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["most_data_settings"]["corpus"]["n_train"] == 20  # data=tiny

    def evaluate(name: str, *overrides: str) -> tuple[dict, dict]:
        eval_cfg = compose_run_config([*EVAL, f"ckpt_path={ckpt}", *overrides], tmp_path / name)
        metrics = run_eval(eval_cfg)
        report = OmegaConf.to_container(OmegaConf.load(Path(eval_cfg.paths.output_dir) / "eval_report.json"))
        return metrics, report

    explicit, explicit_report = evaluate("explicit", *training)
    plain, plain_report = evaluate("plain")
    assert plain == pytest.approx(explicit, abs=1e-6) and "asr/wer_greedy" in plain and "text_ppl/nll" in plain
    assert plain_report["model"] == explicit_report["model"]
    assert plain_report["vocab_size"] == explicit_report["vocab_size"]
    assert plain_report["model"]["hidden_size"] == 64 and plain_report["model"]["kv_lora_rank"] == 16
    assert plain_report["tasks"]["asr"]["metrics"]["n_utterances"] == 3

    # an override still applies: renormalised routing weights change the model's outputs
    renormalised, report = evaluate("override", "router.renormalize=true")
    assert report["model"] == plain_report["model"]
    assert renormalised["text_ppl/nll"] != pytest.approx(plain["text_ppl/nll"], abs=1e-6)
    # an override the weights cannot take is an error naming the field and both values
    with pytest.raises(CheckpointMismatchError, match="model.hidden_size: checkpoint 64, eval config 96"):
        evaluate("bad", "model.hidden_size=96")
