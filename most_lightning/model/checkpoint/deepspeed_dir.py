"""Sharded DeepSpeed checkpoints (what a ZeRO run saves: one directory, one file per rank) -> one fp32 state.

A DeepSpeed checkpoint directory holds `latest` (the tag) and `<tag>/` with the model states and, per
data-parallel rank, the optimizer partition (`*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`; ZeRO-3 also a
model-state file per rank). `check_shards` names any missing file before anything is loaded; `consolidate`
rebuilds the full fp32 parameters with DeepSpeed's own zero_to_fp32 (experts included: they are ordinary
stacked parameters here) and keeps the Lightning state that rank 0 saved beside them (hyper-parameters,
global step). These files are pickles written by DeepSpeed, so they are loaded as such: open only your own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from most_lightning.model.checkpoint.files import CheckpointError

_OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_DS_STATES = ("module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps", "global_steps",
              "dp_world_size", "mp_world_size", "param_shapes", "frozen_param_shapes", "shared_params",
              "buffer_names", "frozen_param_fragments", "ds_config", "ds_version")


def is_deepspeed_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "latest").is_file()


def tag_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    tag = (path / "latest").read_text().strip()
    folder = path / tag
    if not folder.is_dir():
        raise CheckpointError(f"{path}: `latest` names the tag {tag!r} but {folder} does not exist")
    return folder


def _model_state_file(folder: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: missing shard mp_rank_00_model_states.pt (ZeRO-1/2) or "
                          "zero_pp_rank_0_mp_rank_00_model_states.pt (ZeRO-3): not a complete DeepSpeed checkpoint")


def check_shards(path: str | os.PathLike) -> int:
    """The data-parallel world size the checkpoint was saved with; CheckpointError naming the first missing
    shard (optimizer partition, or ZeRO-3 model partition) if the directory is incomplete."""
    folder = tag_dir(path)
    state = torch.load(_model_state_file(folder), map_location="cpu", weights_only=False)
    world = int(state.get("dp_world_size") or 1)
    found = {int(m.group(1)): name for name in os.listdir(folder) if (m := _OPTIM.search(name))}
    prefix = next(iter(found.values()), "zero_pp_rank_0_mp_rank_00_optim_states.pt").split("zero_pp_rank_")[0]
    stage3 = (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()
    for rank in range(world):
        if rank not in found:
            raise CheckpointError(f"{folder}: missing shard {prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt "
                                  f"(the checkpoint was saved by {world} ranks; every rank's file is needed)")
        model_file = folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
        if stage3 and not model_file.is_file():
            raise CheckpointError(f"{folder}: missing shard {model_file.name} (ZeRO-3, saved by {world} ranks)")
    return world


def consolidate(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning-style checkpoint dict: `state_dict` (full fp32 parameters and buffers, the LightningModule's
    names) plus the client state rank 0 saved (hyper_parameters, global_step, ...)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(path)
    check_shards(path)
    folder = tag_dir(path)
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=folder.name)
    client = torch.load(_model_state_file(folder), map_location="cpu", weights_only=False)
    out = {k: v for k, v in client.items() if k not in _DS_STATES}
    out["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in state_dict.items()}
    return out


def universal_for_resume(path: str | os.PathLike, world_size: int, rank: int = 0, timeout_s: float = 1800) -> bool:
    """Prepare a sharded checkpoint for a resume on ``world_size`` ranks. False when it was saved by as many
    ranks (DeepSpeed loads it as it is). Otherwise ZeRO's partitions do not fit the new ranks: rank 0 converts
    the checkpoint once to DeepSpeed's universal format (`<tag>_universal/` + `latest_universal` beside it,
    per-parameter fp32 weights and Adam moments) while the other ranks wait for it; returns True, and the
    engine must then load with `checkpoint.load_universal: true`."""
    import time
    from argparse import Namespace

    path = Path(path)
    saved = check_shards(path)
    if saved == world_size:
        return False
    done = path / "latest_universal"
    if rank == 0 and not done.is_file():
        from deepspeed.checkpoint import ds_to_universal

        folder = tag_dir(path)
        ds_to_universal.main(Namespace(input_folder=str(folder), output_folder=str(path / f"{folder.name}_universal"),
                                       num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                       strict=True, inject_missing_state=True))
    deadline = time.monotonic() + timeout_s
    while not done.is_file():
        if time.monotonic() > deadline:
            raise CheckpointError(f"{path}: rank 0 did not finish the universal conversion in {timeout_s:.0f} s")
        time.sleep(1)
    return True
