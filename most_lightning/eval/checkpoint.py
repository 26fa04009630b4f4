"""Load a MoST model for evaluation from a Lightning checkpoint (.ckpt) or exported weights (.safetensors).

The architecture comes from the run config (model + router groups) and the tokenizer's vocabulary; a
Lightning checkpoint also records the config it was trained with, and any difference is an error that names
the fields and the overrides that fix it. Weights load with torch.load(weights_only=True) or safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from most_lightning.lit.model_config import build_model_config
from most_lightning.model import MoSTForCausalLM
from most_lightning.state_dicts import state_dict_mismatches


class CheckpointMismatchError(ValueError):
    """The checkpoint was trained with another model/router config or tokenizer than the eval config."""


def _flat(prefix: str, values: Mapping[str, Any] | None) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in dict(values or {}).items() if v is not None}


def config_differences(checkpoint_hparams: Mapping[str, Any], model_cfg: Mapping, router_cfg: Mapping,
                       vocab_size: int) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint value, config value) for every model/router field set on both sides that differs,
    plus the vocabulary size."""
    ours = _flat("model", model_cfg) | _flat("router", router_cfg)
    theirs = _flat("model", checkpoint_hparams.get("model")) | _flat("router", checkpoint_hparams.get("router"))
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
    return f"{key}={value}"


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int | None]:
    """(model state dict with the model's own keys, training hparams or {}, global step or None)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), {}, None
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise CheckpointMismatchError(f"{path}: not a checkpoint dict (got {type(ckpt).__name__})")
    if "state_dict" in ckpt:  # Lightning: MoSTLitModule keeps the network as `self.model`
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        return state, dict(ckpt.get("hyper_parameters") or {}), ckpt.get("global_step")
    return ckpt, {}, None  # a bare state dict


def load_model_for_eval(ckpt_path: str | None, model_cfg: Mapping, router_cfg: Mapping,
                        vocab_size: int) -> tuple[MoSTForCausalLM, dict[str, Any]]:
    """Build the configured model and load the checkpoint's weights into it (strictly)."""
    if not ckpt_path:
        raise ValueError("mode=eval needs the weights to evaluate: ckpt_path=<run dir>/checkpoints/last.ckpt "
                         "(a Lightning checkpoint) or a .safetensors file of exported weights")
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file")
    state, hparams, step = read_state_dict(path)
    diffs = config_differences(hparams, model_cfg, router_cfg, vocab_size) if hparams else []
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
    return model, {"path": str(path), "global_step": step}
