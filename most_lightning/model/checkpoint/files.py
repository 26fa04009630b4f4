"""A HF checkpoint directory on disk: config.json + safetensors shards, checked before anything is loaded.

``CheckpointDir(path)`` reads config.json and the safetensors headers only (never the tensor data): it finds
the shards (``model.safetensors.index.json`` or a single ``model.safetensors``), and fails with the file and
key at fault on a missing shard, a truncated file or a key the index places in another file. Tensors are then
read one at a time with ``safe_open`` (memory-mapped), so a load never holds a second copy of the model.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

CONFIG_FILE = "config.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and key and the fix."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16"


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Key -> TensorInfo from the header of one safetensors file; checks that the file holds all the bytes
    its header promises (a truncated download or copy is named here, not deep inside a load)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: only {size} bytes, not a safetensors file (truncated or empty)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated: its header claims {n} bytes but the file has {size} bytes; "
                                  "copy or download the file again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {err})") from None
    header.pop("__metadata__", None)
    infos, data_size = {}, size - 8 - n
    for key, entry in header.items():
        start, end = entry["data_offsets"]
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {key!r} needs bytes {start}..{end} of the data section but the file "
                f"holds only {data_size}; copy or download the file again")
        infos[key] = TensorInfo(path, tuple(entry["shape"]), entry["dtype"])
    return infos


class CheckpointDir:
    """config.json + the safetensors shards of one checkpoint directory (headers only until ``tensors``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory; expected a HF checkpoint directory "
                                  f"({CONFIG_FILE} + *.safetensors)")
        config_path = self.path / CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{self.path}: no {CONFIG_FILE}; expected a HF checkpoint directory")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
        self.files = self._shard_files()
        self.tensors_info: dict[str, TensorInfo] = {}
        for file in self.files:
            for key, info in read_safetensors_header(file).items():
                if key in self.tensors_info:
                    raise CheckpointError(f"{file}: tensor {key!r} is also in {self.tensors_info[key].file.name}")
                self.tensors_info[key] = info
        self._check_index()

    def _shard_files(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                self.weight_map: dict[str, str] | None = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {err}") from None
            names = sorted(set(self.weight_map.values()))
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                keys = [k for k, v in self.weight_map.items() if v == missing[0]][:3]
                raise CheckpointError(
                    f"{self.path}: shard file(s) {missing} listed in {INDEX_FILE} are missing (e.g. {missing[0]} "
                    f"should hold {keys}); copy the complete checkpoint directory")
            return [self.path / n for n in names]
        self.weight_map = None
        if (self.path / SINGLE_FILE).is_file():
            return [self.path / SINGLE_FILE]
        found = sorted(self.path.glob("*.safetensors"))
        if len(found) == 1:
            return found
        if found:
            raise CheckpointError(f"{self.path}: {len(found)} safetensors files but no {INDEX_FILE} to say which "
                                  "tensor is where")
        bins = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
        hint = (f" (found {bins[:3]}: pickled weights are not loaded; convert them to safetensors once, e.g. with "
                "transformers' save_pretrained(safe_serialization=True))") if bins else ""
        raise CheckpointError(f"{self.path}: no *.safetensors weights{hint}")

    def _check_index(self) -> None:
        if self.weight_map is None:
            return
        for key, name in self.weight_map.items():
            info = self.tensors_info.get(key)
            if info is None:
                raise CheckpointError(f"{self.path / name}: {INDEX_FILE} lists tensor {key!r} in this file, but it "
                                      "is not there; the shard does not belong to this checkpoint")
            if info.file.name != name:
                raise CheckpointError(f"{INDEX_FILE} places {key!r} in {name} but it is in {info.file.name}")

    def tensors(self, keys: set[str] | None = None, reader: str = "read") -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) one at a time, shard by shard, in file order; only ``keys`` if given. Each tensor is a
        fresh CPU tensor that the caller drops after use.

        reader="read" (default) reads each tensor's bytes with plain file reads, so the process holds at most
        one checkpoint tensor beyond the model; "mmap" uses safetensors' safe_open, whose mapped pages of the
        whole shard count in the process's resident memory until the shard is closed
        (experiments/measure_checkpoint_import.py measures both)."""
        if reader == "mmap":
            yield from self._tensors_mmap(keys)
            return
        if reader != "read":
            raise ValueError(f"reader={reader!r}: allowed values are 'read' and 'mmap'")
        for file in self.files:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
                header.pop("__metadata__", None)
                entries = sorted(((e["data_offsets"][0], k, e) for k, e in header.items()
                                  if keys is None or k in keys))
                for start, key, entry in entries:
                    dtype = _DTYPES.get(entry["dtype"])
                    if dtype is None:
                        raise CheckpointError(f"{file}: tensor {key!r} has dtype {entry['dtype']}, which is not "
                                              f"supported (supported: {sorted(_DTYPES)})")
                    end = entry["data_offsets"][1]
                    f.seek(8 + n + start)
                    buffer = torch.empty(end - start, dtype=torch.uint8)  # no zero-fill pass (unlike bytearray)
                    if f.readinto(memoryview(buffer.numpy())) != end - start:
                        raise CheckpointError(f"{file}: truncated inside tensor {key!r}")
                    yield key, buffer.view(dtype).reshape(entry["shape"])

    def _tensors_mmap(self, keys: set[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for file in self.files:
            with safe_open(os.fspath(file), framework="pt") as f:
                for key in f.keys():
                    if keys is None or key in keys:
                        try:
                            yield key, f.get_tensor(key)
                        except Exception as err:  # a corrupt file that passed the header check
                            raise CheckpointError(f"{file}: cannot read tensor {key!r}: {err}") from err

    def __repr__(self) -> str:
        return f"CheckpointDir({str(self.path)!r}, {len(self.files)} file(s), {len(self.tensors_info)} tensors)"
