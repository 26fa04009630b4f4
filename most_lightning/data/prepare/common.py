"""What every preparer shares: planned items, the bad-input policy and its log, key and transcript checks.

A preparer *plans* (scans its corpus's index files in the main process, cheap and deterministic) into lists of
items per split; the shard writer then *builds* samples from items in worker processes (decoding, resampling,
encoding, units, speech rendering). Bad inputs found at either stage go through one `BadInputs` policy.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("most_lightning.data.prepare")

OnBad = Literal["skip", "raise"]
MAX_LOGGED_PER_REASON = 20  # every skip is in skipped.tsv; the log names the first ones per reason

# Reasons an input is skipped (manifest `bad_inputs.skipped`), and repairs that keep it (`bad_inputs.fixed`).
REASONS = {
    "missing_audio": "the audio file the index points at does not exist",
    "undecodable_audio": "the audio decoder rejects the file (corrupt, truncated or not audio)",
    "empty_audio": "the audio (or the requested segment) has no samples",
    "segment_out_of_range": "the cut's start/duration reaches past the end of the recording",
    "unsupported_source": "the recording source is not a local file",
    "empty_transcript": "the transcript is empty (or has no words after normalisation)",
    "non_utf8_transcript": "the transcript is not valid UTF-8",
    "bad_index_row": "a row of the index (tsv/jsonl/parquet) is malformed or lacks a required field",
    "duplicate_key": "two inputs map to the same sample key",
    "empty_turn": "a chat has a turn with empty text",
    "bad_role": "a chat turn's role is not system/user/assistant",
    "empty_text": "a text document is empty",
}
FIXES = {"resampled": "audio not at 16 kHz was resampled", "downmixed": "multi-channel audio was mixed to mono"}


class BadInputError(ValueError):
    """A bad input under policy 'raise': names the item, the file and the fix."""

    def __init__(self, key: str, reason: str, detail: str):
        super().__init__(f"bad input {key!r} ({reason}: {REASONS.get(reason, reason)}): {detail}. "
                         "Fix the input, or pass --on-bad skip to count and skip such inputs")
        self.key, self.reason, self.detail = key, reason, detail

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.key, self.reason, self.detail))


class Skip(Exception):
    """Raised while building or planning one item; the policy turns it into a count or a BadInputError."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@dataclass
class BadInputs:
    """Skips (key, reason, detail) in input order, and counts of repairs; 'raise' stops at the first skip."""

    policy: OnBad = "skip"
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    fixed: Counter = field(default_factory=Counter)
    split: str = ""  # planners set the split they are reading; recorded with each skip
    splits: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.policy not in ("skip", "raise"):
            raise ValueError(f"--on-bad must be 'skip' or 'raise', got {self.policy!r}")

    def skip(self, key: str, reason: str, detail: str) -> None:
        if self.policy == "raise":
            raise BadInputError(key, reason, detail)
        self.skipped.append((key, reason, detail))
        self.splits.append(self.split)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(r for _, r, _ in self.skipped).items()))


def log_skips(skipped: list[tuple[str, str, str]], already: Counter) -> None:
    """One log line per skip, the first MAX_LOGGED_PER_REASON per reason (`already` counts what was logged)."""
    for key, reason, detail in skipped:
        already[reason] += 1
        if already[reason] <= MAX_LOGGED_PER_REASON:
            more = " (further skips for this reason are only in skipped.tsv)" \
                if already[reason] == MAX_LOGGED_PER_REASON else ""
            log.warning("skipped %s: %s: %s%s", key, reason, detail, more)


# ---------------------------------------------------------------------------------------------- items
@dataclass
class SpeechItem:
    """One utterance: audio file (optionally a segment of it), original transcript, metadata for `json`."""

    key: str
    audio: str
    text: str
    meta: dict[str, Any]
    start: float = 0.0
    duration: float | None = None
    est_bytes: int = 0


@dataclass
class TextItem:
    key: str
    text: str
    meta: dict[str, Any]
    est_bytes: int = 0


@dataclass
class ChatItem:
    key: str
    messages: list[dict[str, str]]  # [{"role", "text"}], validated
    meta: dict[str, Any]
    est_bytes: int = 0


Item = SpeechItem | TextItem | ChatItem

# Bytes of 16 kHz 16-bit mono FLAC per second of speech (measured on flite speech: ~0.55 of raw PCM); used only
# to plan shards by size before anything is encoded.
FLAC_BYTES_PER_SECOND = 18_000

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(raw: str) -> str:
    """A WebDataset-safe key: no dots (they separate key from member name) and no slashes."""
    return _KEY_UNSAFE.sub("_", raw).strip("_") or "_"


def check_text(key: str, text: Any, empty_reason: str = "empty_transcript") -> str:
    """The stripped text, or Skip: not a string / not encodable as UTF-8 (undecodable bytes read with
    surrogateescape, lone surrogates from JSON) / empty."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exn:
            raise Skip("non_utf8_transcript", f"{exn}") from exn
    if not isinstance(text, str):
        raise Skip("bad_index_row", f"text is {type(text).__name__}, not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exn:
        bad = text[exn.start:exn.end].encode("utf-8", "surrogateescape")
        raise Skip("non_utf8_transcript", f"bytes {bad!r} at character {exn.start} are not UTF-8") from exn
    text = text.strip()
    if not text:
        raise Skip(empty_reason, "empty after stripping whitespace")
    return text


class UniqueKeys:
    """Rejects a second item with the same sanitised key (it would shadow the first in a shard)."""

    def __init__(self):
        self.seen: dict[str, str] = {}

    def check(self, key: str, origin: str) -> None:
        if key in self.seen:
            raise Skip("duplicate_key", f"{origin} maps to key {key!r}, already used by {self.seen[key]}")
        self.seen[key] = origin


# Output FLAC bytes per input byte, by input format (rough: only for planning shards by size).
_FLAC_PER_INPUT_BYTE = {".flac": 1.0, ".wav": 0.55, ".mp3": 3.0, ".ogg": 3.0, ".opus": 4.0}


def est_flac_bytes(path) -> int:
    """Estimated size of `path` re-encoded as 16 kHz FLAC (0 for a missing file: it will be skipped)."""
    import os

    try:
        size = os.stat(path).st_size
    except OSError:
        return 0
    return int(size * _FLAC_PER_INPUT_BYTE.get(os.path.splitext(str(path))[1].lower(), 1.0))


def read_tsv(path, required: tuple[str, ...]):
    """(header, rows as dicts) of a tab-separated index without quoting (Common Voice / VoxPopuli style).
    Undecodable bytes survive as surrogates so check_text can name them; a short row gets a None field."""
    import csv

    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or any(c not in header for c in required):
            raise ValueError(f"{path}: header {header} lacks column(s) "
                             f"{[c for c in required if c not in (header or [])]}; is this the right file?")
        rows = [(n, dict(zip(header, row)) if len(row) == len(header) else None)
                for n, row in enumerate(reader, 2) if row]
    return header, rows


def index_files(paths: list[Path], default_names: tuple[str, ...], corpus: str) -> list[Path]:
    """The tsv index files to read: files as given, and for a directory its `<name>.tsv` for each default name."""
    out = []
    for path in paths:
        if path.is_dir():
            found = [path / f"{name}.tsv" for name in default_names if (path / f"{name}.tsv").is_file()]
            if not found:
                raise FileNotFoundError(f"{path} has none of {[f'{n}.tsv' for n in default_names]}")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"{corpus} index {path} does not exist")
    return out
