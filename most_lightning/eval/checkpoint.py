"""Load a MoST model for evaluation from a Lightning checkpoint (.ckpt) or exported weights (.safetensors).

The architecture comes from the run config (model + router groups) and the tokenizer's vocabulary; a
Lightning checkpoint also records the config it was trained with, and any difference is an error that names
the fields and the overrides that fix it. Weights load with torch.load(weights_only=True) or safetensors.
A MoST-C model (audio=continuous) also needs its audio input (trainable projection + frozen encoder): both
come from the Lightning checkpoint's `audio_input.*` state, where the training run saved them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from most_lightning.model.config_groups import build_model_config
from most_lightning.model import MoSTForCausalLM
from most_lightning.state_dicts import state_dict_mismatches


class CheckpointMismatchError(ValueError):
    """The checkpoint was trained with another model/router config or tokenizer than the eval config."""


def _flat(prefix: str, values: Mapping[str, Any] | None) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in dict(values or {}).items() if v is not None}


def _audio_fields(audio: Mapping | None) -> dict[str, Any]:
    """The `audio` group's fields that change what the model reads: the mode, and for a continuous model the
    encoder and the frame markers (a checkpoint without an `audio` record was trained on units)."""
    from most_lightning.data.continuous import AudioFrontendConfig

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


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any], int | None]:
    """(model state, audio-input state (`audio_input.` prefix removed, {} if none), hparams or {}, step)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), {}, {}, None
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise CheckpointMismatchError(f"{path}: not a checkpoint dict (got {type(ckpt).__name__})")
    if "state_dict" in ckpt:  # Lightning: MoSTLitModule keeps the network as `self.model`, MoST-C's as `audio_input`
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        audio = {k.removeprefix("audio_input."): v for k, v in ckpt["state_dict"].items()
                 if k.startswith("audio_input.")}
        return state, audio, dict(ckpt.get("hyper_parameters") or {}), ckpt.get("global_step")
    return ckpt, {}, {}, None  # a bare state dict


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int | None]:
    """(model state dict with the model's own keys, training hparams or {}, global step or None)."""
    state, _, hparams, step = _read(path)
    return state, hparams, step


def load_model_for_eval(ckpt_path: str | None, model_cfg: Mapping, router_cfg: Mapping,
                        vocab_size: int) -> tuple[MoSTForCausalLM, dict[str, Any]]:
    """Build the configured model and load the checkpoint's weights into it (strictly)."""
    model, _, info = load_for_eval(ckpt_path, model_cfg, router_cfg, vocab_size)
    return model, info


def _load_audio_input(path: Path, audio_cfg: Mapping | None, audio_state: dict[str, torch.Tensor],
                      hidden_size: int) -> Any:
    """The MoST-C audio input of a continuous `audio` config with the checkpoint's weights (projection, and the
    frozen encoder when it has weights: the checkpoint's copy, i.e. exactly what the model was trained with);
    None for a units model."""
    from most_lightning.model.audio_input import build_audio_input

    audio_input = build_audio_input(audio_cfg, hidden_size)
    if audio_input is None:
        if audio_state:
            raise CheckpointMismatchError(f"{path} holds a continuous audio input (audio_input.* weights) but the eval "
                                          "config reads speech as units: run the eval with audio=continuous")
        return None
    if not audio_state:
        raise CheckpointMismatchError(
            f"{path} has no audio_input.* weights, which audio=continuous needs (the trained projection of MoST-C): "
            "evaluate the Lightning checkpoint of the continuous training run (<run>/checkpoints/last.ckpt), "
            "not exported decoder weights, or drop audio=continuous for a units model")
    detail = state_dict_mismatches(audio_input.state_dict(), audio_state, shown=3)
    if detail:
        raise CheckpointMismatchError(f"{path}: its audio input does not fit the configured audio.encoder "
                                      f"({'; '.join(detail)}): pass the training run's audio overrides")
    audio_input.load_state_dict(audio_state)
    return audio_input.eval().requires_grad_(False)


def load_for_eval(ckpt_path: str | None, model_cfg: Mapping, router_cfg: Mapping, vocab_size: int,
                  audio_cfg: Mapping | None = None) -> tuple[MoSTForCausalLM, Any, dict[str, Any]]:
    """(model, audio input or None, info): the configured model (and MoST-C audio input for a continuous `audio`
    config) with the checkpoint's weights, loaded strictly."""
    if not ckpt_path:
        raise ValueError("mode=eval needs the weights to evaluate: ckpt_path=<run dir>/checkpoints/last.ckpt "
                         "(a Lightning checkpoint) or a .safetensors file of exported weights")
    from ..checkpoint_safety import local_checkpoint_path

    path = Path(local_checkpoint_path(ckpt_path))  # a URL is refused here, before anything is fetched
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file")
    state, audio_state, hparams, step = _read(path)
    diffs = config_differences(hparams, model_cfg, router_cfg, vocab_size, audio_cfg) if hparams else []
    if diffs:
        lines = "\n".join(f"  {k}: checkpoint {a!r}, eval config {b!r}" for k, a, b in diffs)
        fix = " ".join(_override(k, a) for k, a, _ in diffs if not k.startswith("vocab_size"))
        raise CheckpointMismatchError(
            f"{path} was trained with another config:\n{lines}\nRun the eval with the training run's overrides "
            f"(its config_resolved.yaml has them){': ' + fix if fix else ''}"
            + ("; the vocabulary comes from the data config (data.corpus...), which must be the training run's"
               if any(k.startswith("vocab_size") for k, _, _ in diffs) else ""))
    config = build_model_config(model_cfg, router_cfg, vocab_size)
    model = MoSTForCausalLM(config)
    detail = state_dict_mismatches(model.state_dict(), state, shown=3)
    if detail:
        raise CheckpointMismatchError(f"{path} does not fit the configured model ({'; '.join(detail)}): it was "
                                      "written for another model config; pass the training run's model overrides")
    model.load_state_dict(state)
    model.eval()
    audio_input = _load_audio_input(path, audio_cfg, audio_state, config.hidden_size)
    info = {"path": str(path), "global_step": step, "audio_mode": "continuous" if audio_input is not None else "units"}
    return model, audio_input, info
