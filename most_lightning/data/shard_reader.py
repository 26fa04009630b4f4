"""Read one WebDataset .tar shard into raw samples, and notice every way it can be short or corrupt.

Python's tarfile (and webdataset on top of it) ends a stream quietly when a file stops exactly at a member
boundary, so a cut shard used to lose its remaining samples without a word. Here:

- a shard listed in a manifest.json (the demo corpus' or a prepared corpus', found beside the shard or one folder
  up) is checked against it when it is opened: its size in bytes, and with `verify='sha256'` its full checksum;
  after the last sample, the number of samples read is compared with the manifest's count;
- a tar must end with its end-of-archive block; a stream that stops without one (at a member boundary, inside a
  header, inside a member's data, an empty file) is truncated;
- the sample being read when the shard ends early is dropped unless its members are exactly those of the sample
  before it (a cut between two samples keeps the last whole one, a cut inside a sample drops it).

Each problem becomes one CorruptShardError ('corrupt_shard') carrying the number of samples lost (from the
manifest count; without a manifest, at least the dropped sample, and at least 1) for the bad-sample policy:
'raise' stops (at open for a size or checksum mismatch), 'skip' keeps every whole sample and counts the lost ones.
A checksum mismatch drops the whole shard (its bytes cannot be trusted). Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, get_args

log = logging.getLogger(__name__)

VerifyShards = Literal["none", "size", "sha256"]
VERIFY_SHARDS = get_args(VerifyShards)
MANIFEST = "manifest.json"
BLOCK = 512


@dataclass(frozen=True)
class ShardExpectation:
    """What a manifest says about one shard."""

    samples: int | None
    bytes: int | None
    sha256: str | None
    manifest: str


# ---------------------------------------------------------------------------------------------- manifests
_MANIFESTS: dict[tuple[str, float], dict[str, ShardExpectation]] = {}
_CHECKSUMS: dict[tuple[str, int, float], str] = {}
_NOTED: set[str] = set()  # shards whose size mismatch this process has logged


def _entries(node: Any) -> Iterator[dict]:
    """Every {path|name: *.tar, samples: int, ...} record anywhere in a manifest."""
    if isinstance(node, dict):
        name = node.get("path", node.get("name"))
        if isinstance(name, str) and name.endswith(".tar") and isinstance(node.get("samples"), int):
            yield node
        for value in node.values():
            yield from _entries(value)
    elif isinstance(node, list):
        for value in node:
            yield from _entries(value)


def _manifest_records(path: Path) -> dict[str, ShardExpectation]:
    key = (str(path), path.stat().st_mtime)
    if key not in _MANIFESTS:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exn:
            log.warning("cannot read %s (%s): its shards are not checked", path, exn)
            data = {}
        records = {}
        for e in _entries(data):
            shard = os.path.normpath(path.parent / e.get("path", e.get("name")))
            records[shard] = ShardExpectation(int(e["samples"]), e.get("bytes"), e.get("sha256"), str(path))
        _MANIFESTS[key] = records
    return _MANIFESTS[key]


def expected_shard(shard: str | os.PathLike) -> ShardExpectation | None:
    """The manifest record of `shard` (manifest.json in its folder or the folder above), if one lists it."""
    path = Path(os.path.abspath(shard))
    for folder in (path.parent, path.parent.parent):
        manifest = folder / MANIFEST
        if manifest.is_file():
            found = _manifest_records(manifest).get(os.path.normpath(path))
            if found is not None:
                return found
    return None


def shard_sha256(path: str) -> str:
    """Hex sha256 of a shard, cached per (path, size, mtime): a shard re-read every pass is hashed once."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime)
    if key not in _CHECKSUMS:
        with open(path, "rb") as f:
            _CHECKSUMS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _CHECKSUMS[key]


# ---------------------------------------------------------------------------------------------- tar reading
_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key = path up to the first dot of the file name


class ShardEndedEarly(Exception):
    """The tar stream stopped before its end-of-archive block; `partial` if it stopped inside a sample's data."""

    def __init__(self, reason: str, partial: bool):
        super().__init__(reason)
        self.reason, self.partial = reason, partial


def _tar_groups(path: str) -> Iterator[dict[str, Any]]:
    """Samples as {'__key__', member suffix: bytes} in file order; the last one is held back until the end of the
    archive is seen. Raises ShardEndedEarly (after yielding what is whole) on any early end."""
    with open(path, "rb") as f:
        group: dict[str, Any] | None = None
        in_data = False  # reading a member's bytes (an early end there leaves that sample incomplete)
        try:
            tf = tarfile.open(fileobj=f, mode="r|")
            for info in tf:
                if not info.isreg():
                    continue
                m = _NAME.match(info.name)
                if m is None:
                    continue
                key, suffix = m.group(1), m.group(2).lower()
                if group is None or group["__key__"] != key:
                    if group is not None:
                        yield group
                    group = {"__key__": key}
                in_data = True
                reader = tf.extractfile(info)
                group[suffix] = reader.read() if reader is not None else b""
                in_data = False
            offset = tf.offset
        except (tarfile.TarError, OSError, EOFError) as exn:
            reason = f"{type(exn).__name__}: {exn}"
            if group is not None and not in_data:  # stopped in a header: the sample before may be whole
                raise _EndWithLast(group, reason) from None
            raise ShardEndedEarly(reason, partial=group is not None) from None
        f.seek(offset)
        end = f.read(BLOCK)
        if len(end) < BLOCK or end.count(0) != BLOCK:
            reason = f"the file stops at byte {offset} without the tar end-of-archive block"
            if group is not None:
                raise _EndWithLast(group, reason)
            raise ShardEndedEarly(f"no end-of-archive block after byte {offset}", partial=False)
        if group is not None:
            yield group


class _EndWithLast(ShardEndedEarly):
    """An early end between members; the held-back last sample travels along (kept if it looks whole)."""

    def __init__(self, last: dict[str, Any], reason: str):
        super().__init__(reason, partial=False)
        self.last = last


def _whole_samples(shard: str):
    """Whole samples of a shard; the generator returns (reason of an early end or None, samples dropped at it)."""
    previous: set[str] | None = None
    try:
        for group in _tar_groups(shard):
            previous = set(group) - {"__key__"}
            yield group
    except ShardEndedEarly as early:
        dropped = 1 if early.partial else 0
        last = getattr(early, "last", None)
        if last is not None:
            if previous is not None and set(last) - {"__key__"} == previous:
                yield last
            else:
                dropped = 1
        return early.reason, dropped
    return None, 0


def count_whole_samples(shard: str) -> int:
    """Whole samples a (possibly cut) shard still holds."""
    return sum(1 for _ in _whole_samples(shard))


def read_shard_samples(shard: str, on_corrupt: Callable[[str, int], None], verify: VerifyShards = "size",
                       owns: Callable[[int], bool] | None = None,
                       stop_at_open: bool = False) -> Iterator[dict[str, Any]]:
    """Whole raw samples of `shard` ({'__key__', '__url__', member: bytes}); every problem goes to
    `on_corrupt(reason, n_lost)`, which raises or counts. `owns(i)`: whether sample i of this shard is this
    reader's (readers that stride over shared shards count only their own lost samples). A size mismatch found
    at open goes to on_corrupt at once with `stop_at_open` (the 'raise' policy); otherwise it is logged once and
    the read that follows counts what is lost."""
    owns = owns or (lambda i: True)
    expected = expected_shard(shard) if verify != "none" else None
    where = f" (manifest {expected.manifest}: {expected.samples} samples" + \
        (f", {expected.bytes} bytes)" if expected and expected.bytes is not None else ")") if expected else ""

    def lost_from(first: int, dropped: int) -> int:
        if expected is not None:
            return sum(owns(i) for i in range(first, expected.samples))
        return sum(owns(i) for i in range(first, first + max(dropped, 1)))  # at least one, count unknown

    try:
        size = os.path.getsize(shard)
    except OSError as exn:
        on_corrupt(f"cannot open it ({type(exn).__name__}: {exn}){where}", lost_from(0, 0))
        return
    if expected is not None:
        if expected.bytes is not None and size != expected.bytes:
            reason = f"{size} bytes, the manifest says {expected.bytes}{where}"
            if stop_at_open:
                on_corrupt(reason, lost_from(min(count_whole_samples(shard), expected.samples), 0))
            elif shard not in _NOTED:
                _NOTED.add(shard)
                log.warning("shard %s: %s", shard, reason)
        if verify == "sha256" and expected.sha256 and shard_sha256(shard) != expected.sha256:
            on_corrupt(f"sha256 differs from the manifest's (data.verify=sha256){where}: whole shard dropped",
                       lost_from(0, 0))
            return
    n = 0
    reader = _whole_samples(shard)
    while True:
        try:
            group = next(reader)
        except StopIteration as stop:
            early, dropped = stop.value
            break
        n += 1
        yield {**group, "__url__": shard}
    if early is not None:
        on_corrupt(f"truncated or not a tar ({early}); {n} whole sample(s) read{where}", lost_from(n, dropped))
        return
    if expected is not None and expected.samples != n:
        if n < expected.samples:
            on_corrupt(f"{n} samples, the manifest says {expected.samples}{where}", lost_from(n, 0))
        else:
            log.warning("shard %s has %d samples, more than its manifest's %d (%s): a stale manifest?", shard, n,
                        expected.samples, expected.manifest)
