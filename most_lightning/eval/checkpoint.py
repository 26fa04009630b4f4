"""Load a MoST model for evaluation from a Lightning checkpoint (.ckpt) or exported weights (.safetensors).

A Lightning checkpoint is read by the one reader of MoSTLitModule checkpoints (most_lightning.lit.checkpoint):
the module is rebuilt from the eval config's model / router / audio groups, which ``run.py mode=eval`` takes
from the checkpoint itself (command-line overrides applied on top, and listed in the log). A checkpoint its
config does not fit is an error that names the differing fields and the weights that do not fit. Exported
weights hold no config: the architecture comes from the eval config. A MoST-C model (audio=continuous) also
needs its audio input (trainable projection + frozen encoder), which only the Lightning checkpoint holds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from most_lightning.model import MoSTForCausalLM
from most_lightning.model.config_groups import build_model_config
from most_lightning.state_dicts import state_dict_mismatches

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The checkpoint was trained with another model/router config or tokenizer than the eval config."""


def _flat(prefix: str, values: Mapping[str, Any] | None) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in dict(values or {}).items() if v is not None}


def _audio_fields(audio: Mapping | None) -> dict[str, Any]:
    """The `audio` group's fields that change what the model reads: the mode, and for a continuous model the
    encoder and the frame markers (a checkpoint without an `audio` record was trained on units)."""
    from most_lightning.audio.frontend import AudioFrontendConfig

    cfg = AudioFrontendConfig.from_any(audio)
    if not cfg.continuous:
        return {"audio.mode": cfg.mode}
    return {"audio.mode": cfg.mode, "audio.markers": cfg.markers} | _flat("audio.encoder", cfg.encoder)


def config_differences(checkpoint_hparams: Mapping[str, Any], model_cfg: Mapping, router_cfg: Mapping,
                       vocab_size: int, audio_cfg: Mapping | None = None) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint value, config value) for every model/router field set on both sides that differs,
    the audio front end (mode; encoder and markers of a continuous model), plus the vocabulary size."""
    ours = _flat("model", model_cfg) | _flat("router", router_cfg) | _audio_fields(audio_cfg)
    theirs = (_flat("model", checkpoint_hparams.get("model")) | _flat("router", checkpoint_hparams.get("router"))
              | _audio_fields(checkpoint_hparams.get("audio")))
    diffs = []
    for key in sorted(set(ours) & set(theirs)):
        a, b = theirs[key], ours[key]
        if (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            diffs.append((key, a, b))
    ckpt_vocab = checkpoint_hparams.get("vocab_size")
    if ckpt_vocab is not None and int(ckpt_vocab) != int(vocab_size):
        diffs.append(("vocab_size (tokenizer of the data config)", ckpt_vocab, vocab_size))
    return diffs


def _override(key: str, value: Any) -> str:
    if key == "router.name":
        return f"router={value}"
    if key == "audio.mode":  # the conf/audio preset of that mode
        return "audio=continuous" if value == "continuous" else "audio=units_mfcc (or the run's units preset)"
    return f"{key}={value}"


def _differences_text(path: Path, diffs: list[tuple[str, Any, Any]]) -> str:
    if not diffs:
        return f"{path}:"
    lines = "\n".join(f"  {k}: checkpoint {a!r}, eval config {b!r}" for k, a, b in diffs)
    return f"{path} was trained with another config:\n{lines}"


def _fix_text(diffs: list[tuple[str, Any, Any]]) -> str:
    fix = " ".join(_override(k, a) for k, a, _ in diffs if not k.startswith("vocab_size"))
    return ("Leave these settings to the checkpoint (`mode=eval ckpt_path=...` takes them from it) or give the "
            f"training run's values{': ' + fix if fix else ''}")


def _is_bare_state_dict(ckpt: Any) -> bool:
    return isinstance(ckpt, dict) and bool(ckpt) and all(isinstance(v, torch.Tensor) for v in ckpt.values())


def _model_from_weights(path: Path, state: dict[str, torch.Tensor], model_cfg: Mapping, router_cfg: Mapping,
                        vocab_size: int) -> MoSTForCausalLM:
    """Exported weights or a bare state dict: the architecture comes from the eval config alone."""
    model = MoSTForCausalLM(build_model_config(model_cfg, router_cfg, vocab_size))
    detail = state_dict_mismatches(model.state_dict(), state, shown=3)
    if detail:
        raise CheckpointMismatchError(f"{path} does not fit the configured model ({'; '.join(detail)}): it was "
                                      "written for another model config; pass the training run's model overrides")
    model.load_state_dict(state)
    return model.eval()


def _check_audio_input(path: Path, state: Mapping[str, torch.Tensor], audio_cfg: Mapping | None) -> None:
    """The MoST-C audio input is in the weights exactly when the eval config reads speech as continuous features."""
    from most_lightning.data.continuous import AudioFrontendConfig

    has_audio_input = any(k.startswith("audio_input.") for k in state)
    continuous = AudioFrontendConfig.from_any(audio_cfg).continuous
    if has_audio_input and not continuous:
        raise CheckpointMismatchError(f"{path} holds a continuous audio input (audio_input.* weights) but the eval "
                                      "config reads speech as units: run the eval with audio=continuous")
    if continuous and not has_audio_input:
        raise CheckpointMismatchError(
            f"{path} has no audio_input.* weights, which audio=continuous needs (the trained projection of MoST-C): "
            "evaluate the Lightning checkpoint of the continuous training run (<run>/checkpoints/last.ckpt), "
            "not exported decoder weights, or drop audio=continuous for a units model")


def read_eval_checkpoint(ckpt_path: str | None) -> tuple[Path, Mapping[str, Any]]:
    """(local path, contents) of what mode=eval evaluates: a Lightning checkpoint (file or sharded DeepSpeed
    directory), exported .safetensors weights or a bare state dict; always read without unpickling code."""
    from most_lightning.checkpoint_safety import local_checkpoint_path
    from most_lightning.lit.checkpoint import read_checkpoint

    if not ckpt_path:
        raise ValueError("mode=eval needs the weights to evaluate: ckpt_path=<run dir>/checkpoints/last.ckpt "
                         "(a Lightning checkpoint) or a .safetensors file of exported weights")
    path = Path(local_checkpoint_path(ckpt_path))  # a URL is refused here, before anything is fetched
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return path, load_file(str(path))
    if path.is_dir():
        return path, read_checkpoint(path)
    return path, torch.load(str(path), map_location="cpu", weights_only=True)


def is_lightning_checkpoint(ckpt: Any) -> bool:
    """A checkpoint dict (with settings), as opposed to bare weights (exported or a plain state dict)."""
    return not _is_bare_state_dict(ckpt)


def load_model_for_eval(ckpt_path: str | None, model_cfg: Mapping, router_cfg: Mapping,
                        vocab_size: int) -> tuple[MoSTForCausalLM, dict[str, Any]]:
    """Build the configured model and load the checkpoint's weights into it (strictly)."""
    model, _, info = load_for_eval(ckpt_path, model_cfg, router_cfg, vocab_size)
    return model, info


def load_for_eval(ckpt_path: str | None, model_cfg: Mapping, router_cfg: Mapping, vocab_size: int,
                  audio_cfg: Mapping | None = None,
                  ckpt: Mapping[str, Any] | None = None) -> tuple[MoSTForCausalLM, Any, dict[str, Any]]:
    """(model, audio input or None, info): the model of the given model / router / audio config (and MoST-C audio
    input for a continuous `audio` config) with the checkpoint's weights, loaded strictly. ``ckpt``: the
    checkpoint dict of ``ckpt_path`` when the caller has read it already."""
    from most_lightning.lit.checkpoint import WeightsMismatchError, check_lit_checkpoint, module_from_checkpoint

    if ckpt is None:
        path, ckpt = read_eval_checkpoint(ckpt_path)
    else:
        path = Path(str(ckpt_path))
    info: dict[str, Any] = {"path": str(path), "global_step": None}
    if _is_bare_state_dict(ckpt):
        _check_audio_input(path, ckpt, audio_cfg)
        model = _model_from_weights(path, dict(ckpt), model_cfg, router_cfg, vocab_size)
        return model, None, info | {"audio_mode": "units"}
    check_lit_checkpoint(ckpt, path)
    hparams = ckpt["hyper_parameters"]
    diffs = config_differences(hparams, model_cfg, router_cfg, vocab_size, audio_cfg)
    if any(k.startswith("vocab_size") for k, _, _ in diffs):
        raise CheckpointMismatchError(
            f"{_differences_text(path, diffs)}\nThe vocabulary comes from the data config (data.corpus..., "
            "data.tokenizer), which must be the training run's: leave it to the checkpoint")
    try:
        _check_audio_input(path, ckpt["state_dict"], audio_cfg)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{_differences_text(path, diffs)}\n{err}. {_fix_text(diffs)}") from None
    try:
        module = module_from_checkpoint(ckpt, path, model=model_cfg, router=router_cfg, audio=audio_cfg)
    except WeightsMismatchError as err:
        raise CheckpointMismatchError(f"{_differences_text(path, diffs)}\nIts weights do not fit that config "
                                      f"({err.detail}). {_fix_text(diffs)}") from None
    if diffs:  # the command line changed settings the weights still fit (e.g. another router over the same gate)
        lines = "\n".join(f"  {k}: checkpoint {a!r}, eval config {b!r}" for k, a, b in diffs)
        log.warning(f"{path} is evaluated with settings other than its own (the command line's):\n{lines}")
    audio_input = module.audio_input
    if audio_input is not None:
        audio_input.requires_grad_(False)
    info |= {"global_step": ckpt.get("global_step"),
             "audio_mode": "continuous" if audio_input is not None else "units"}
    return module.model, audio_input, info
