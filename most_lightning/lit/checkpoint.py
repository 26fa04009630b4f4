"""The one reader of MoSTLitModule checkpoints (eval, export, the checks before a resume), and the run settings a
checkpoint carries.

``load_lit_module(path)`` does what ``MoSTLitModule.load_from_checkpoint(path)`` does (the module built from
the saved hyperparameters, overrides given as keyword arguments, state loaded strictly, ``on_load_checkpoint``
called) and also reads sharded DeepSpeed checkpoint directories, always with ``weights_only=True``; a
checkpoint that lacks what a MoSTLitModule saves is refused naming the missing keys.

A training run also records its resolved data group (``RecordDataSettings``), so that ``python run.py
mode=eval ckpt_path=X`` evaluates the trained model on the trained data settings without the training
overrides (``with_checkpoint_settings``); settings given on the command line still apply on top.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from most_lightning.model.checkpoint.files import CheckpointError
from most_lightning.state_dicts import state_dict_mismatches

log = logging.getLogger(__name__)

# What every MoSTLitModule checkpoint holds: the weights and the hyperparameters that rebuild the module.
REQUIRED_KEYS = ("state_dict", "hyper_parameters")
REQUIRED_HPARAMS = ("model", "router", "vocab_size")
# The run config's groups that a checkpoint fixes: the module's hyperparameters, and the recorded data group.
HPARAM_GROUPS = ("model", "router", "audio")
DATA_KEY = "most_data_settings"


class WeightsMismatchError(CheckpointError):
    """A checkpoint's weights do not fit the module its (possibly overridden) settings build."""

    def __init__(self, source: str | Path, detail: list[str]) -> None:
        self.detail = "; ".join(detail)
        super().__init__(f"{source} does not fit the model its settings describe: {self.detail}")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of a .ckpt file or of a sharded DeepSpeed checkpoint directory (consolidated to fp32),
    read with weights_only=True (tensors and plain containers only), checked for what a MoSTLitModule saves."""
    from most_lightning.model.checkpoint.deepspeed_dir import consolidate, is_deepspeed_checkpoint

    path = Path(path)
    if is_deepspeed_checkpoint(path):
        ckpt = consolidate(path)
    elif path.is_file():
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path}: no such checkpoint file or sharded DeepSpeed checkpoint directory")
    check_lit_checkpoint(ckpt, path)
    return ckpt


def check_lit_checkpoint(ckpt: Any, path: str | Path = "checkpoint") -> None:
    """Refuse what is not a MoSTLitModule checkpoint, naming the keys it lacks."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: not a checkpoint dict (got {type(ckpt).__name__})")
    hparams = ckpt.get("hyper_parameters")
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    missing += [f"hyper_parameters.{key}" for key in REQUIRED_HPARAMS
                if not isinstance(hparams, Mapping) or key not in hparams]
    if missing:
        raise CheckpointError(f"{path}: not a MoSTLitModule checkpoint: it lacks {', '.join(missing)} "
                              "(a Lightning checkpoint written by python run.py has them)")


def module_from_checkpoint(ckpt: Mapping[str, Any], source: str | Path = "checkpoint", **overrides: Any):
    """A MoSTLitModule from a checkpoint dict: its hyperparameters (``overrides`` replace some, e.g. model=...),
    its weights loaded strictly (a mismatch names the keys), in eval mode."""
    from most_lightning.lit.module import MoSTLitModule

    hparams = {**ckpt["hyper_parameters"], **overrides}
    module = MoSTLitModule(**hparams)
    state = ckpt["state_dict"]
    detail = state_dict_mismatches(module.state_dict(), state, shown=3)
    if detail:
        raise WeightsMismatchError(source, detail)
    module.load_state_dict(state, strict=True)
    module.on_load_checkpoint(dict(ckpt))
    return module.eval()


def load_lit_module(path: str | Path, **overrides: Any):
    """``MoSTLitModule.load_from_checkpoint(path, **overrides)`` for .ckpt files and DeepSpeed directories."""
    return module_from_checkpoint(read_checkpoint(path), path, **overrides)


def check_resume_checkpoint(module: Any, path: str | Path) -> None:
    """Before Lightning restores a training run from ``path`` (weights, optimizer, loops, data position): the
    reader's checks, so that a checkpoint that is not a MoSTLitModule's, or whose weights do not fit the module
    this run builds, stops naming the keys. A sharded DeepSpeed directory is left to the DeepSpeed strategy
    (consolidating it here would gather every shard into one process)."""
    from most_lightning.model.checkpoint.deepspeed_dir import is_deepspeed_checkpoint

    if is_deepspeed_checkpoint(Path(path)):
        return
    ckpt = read_checkpoint(path)
    detail = state_dict_mismatches(module.state_dict(), ckpt["state_dict"], shown=3)
    if detail:
        raise WeightsMismatchError(path, detail + ["resume with the overrides of the run that wrote it"])


class RecordDataSettings(Callback):
    """Writes the run's resolved data group into every checkpoint it saves (``checkpoint[DATA_KEY]``)."""

    def __init__(self, data: Mapping | DictConfig | None) -> None:
        self.data = _plain(data)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self.data is not None:
            checkpoint[DATA_KEY] = self.data


def saved_settings(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The run config's groups a checkpoint records: model, router, audio (its hyperparameters) and data."""
    hparams = ckpt.get("hyper_parameters") or {}
    settings = {group: hparams[group] for group in HPARAM_GROUPS if group in hparams}
    if ckpt.get(DATA_KEY) is not None:
        settings["data"] = ckpt[DATA_KEY]
    return settings


def _override_key(override: str) -> tuple[str, bool]:
    """(the dotted key of a command-line override, whether it deletes the key): `+a.b=1` -> ("a.b", False)."""
    key = override.split("=", 1)[0]
    return key.lstrip("+~"), key.startswith("~")


def with_checkpoint_settings(cfg: DictConfig, settings: Mapping[str, Any], overrides: Sequence[str]) -> DictConfig:
    """``cfg`` with each group of ``settings`` (what the checkpoint was trained with) in place of the composed
    one, then the command line's ``overrides`` of that group applied again on top (their values as Hydra composed
    them). A group chosen on the command line (``router=vanilla``) is taken as composed."""
    parsed = [_override_key(str(o)) for o in overrides]
    cfg = cfg.copy()
    for group, saved in settings.items():
        if any(key == group for key, _ in parsed):
            log.info(f"{group}: the group chosen on the command line replaces the checkpoint's")
            continue
        node = OmegaConf.create(saved) if saved is not None else None
        for key, delete in parsed:
            if not key.startswith(f"{group}."):
                continue
            inner = key[len(group) + 1:]
            if node is None:
                node = OmegaConf.create({})
            if delete:
                parent, _, leaf = inner.rpartition(".")
                holder = OmegaConf.select(node, parent) if parent else node
                if isinstance(holder, DictConfig) and leaf in holder:
                    with open_dict(holder):
                        del holder[leaf]
            else:
                OmegaConf.update(node, inner, OmegaConf.select(cfg, key), merge=False, force_add=True)
        with open_dict(cfg):
            cfg[group] = node
    return cfg


def command_line_overrides(cfg: DictConfig) -> list[str]:
    """The overrides the run was started with: ``cfg.hydra`` of a composed config, else Hydra's own record."""
    if cfg.get("hydra") is not None:
        return [str(o) for o in cfg.hydra.overrides.task]
    from hydra.core.hydra_config import HydraConfig

    return [str(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []


def _plain(node: Mapping | DictConfig | None) -> dict[str, Any] | None:
    if node is None:
        return None
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)
