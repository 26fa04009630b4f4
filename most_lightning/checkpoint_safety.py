"""Checkpoint files are data, never code: local paths only, and torch.load with weights_only=True every time.

A pickled checkpoint can run arbitrary code when it is unpickled. torch.load refuses that by default
(`weights_only=True`), but an environment variable (`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`) turns the default off
for every call that does not pass the argument, and Lightning loads `http(s)://` checkpoints with
`weights_only=False` unless told otherwise. So every load in this project goes through `load_weights_only`
(or passes `weights_only=True` itself), which no environment variable overrides, and a checkpoint setting that
names a remote address is refused before anything is fetched: download the file, then give its local path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class RemoteCheckpointError(ValueError):
    """A checkpoint setting names a URL (http, https, s3, hf, ...) instead of a local file."""


def local_checkpoint_path(value: str | os.PathLike, setting: str = "ckpt_path") -> str:
    """`value` as a local path; RemoteCheckpointError (naming the setting) for any `scheme://` address except
    file://, which is reduced to its path."""
    text = os.fspath(value)
    if text.startswith("file://"):
        return text[len("file://"):]
    if _REMOTE.match(text):
        raise RemoteCheckpointError(
            f"{setting}={text}: remote checkpoints are not loaded (a checkpoint from the network could run code "
            f"when it is unpickled). Download it first, check where it comes from, and pass the local file: "
            f"{setting}=/path/to/{Path(text.split('?')[0]).name or 'model.ckpt'}")
    return text


def load_weights_only(path: str | os.PathLike, map_location: Any = "cpu", setting: str = "ckpt_path") -> Any:
    """torch.load of a local file with weights_only=True passed explicitly (so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
    cannot switch it off): tensors, containers and plain values only; anything else raises UnpicklingError."""
    return torch.load(local_checkpoint_path(path, setting), map_location=map_location, weights_only=True)
