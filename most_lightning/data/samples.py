"""Shard sample schema, decoding and validation, and the bad-sample policy.

Speech sample members: `flac` (audio), `txt` (normalised transcript), `json` (metadata: voice, duration,
sample_rate, split, ...), `units.npy` (int16 unit ids at 25 Hz, NOT deduplicated). Text sample: `txt`, `json`.
Nothing is unpickled: units are read with numpy `allow_pickle=False`.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import numpy as np

from ..audio.io import TARGET_SAMPLE_RATE, AudioDecodeError, audio_info, read_audio
from ..audio.units import dedup_units
from .shard_reader import VerifyShards, read_shard_samples

log = logging.getLogger(__name__)

AUDIO_MEMBER, TEXT_MEMBER, META_MEMBER, UNITS_MEMBER = "flac", "txt", "json", "units.npy"
SPEECH_MEMBERS = (AUDIO_MEMBER, TEXT_MEMBER, META_MEMBER, UNITS_MEMBER)
TEXT_MEMBERS = (TEXT_MEMBER, META_MEMBER)
OnBadSample = Literal["skip", "raise"]
VerifyAudio = Literal["none", "header", "full"]


# ---------------------------------------------------------------------------------------------- errors
class BadSampleError(ValueError):
    """A sample that cannot be used; names the sample key and its shard."""

    def __init__(self, key: str, shard: str, reason: str):
        super().__init__(f"bad sample {key!r} in shard {shard}: {reason}")
        self.key, self.shard, self.reason = key, shard, reason


class MissingMemberError(BadSampleError):
    pass


class EmptyTranscriptError(BadSampleError):
    pass


class TranscriptEncodingError(EmptyTranscriptError):
    pass


class UndecodableAudioError(BadSampleError):
    pass


class WrongSampleRateError(BadSampleError):
    pass


class InvalidUnitsError(BadSampleError):
    pass


class NotMonoAudioError(BadSampleError):
    """Stereo (or more channels): the units were computed on mono 16 kHz audio, so the sample is suspect."""


class BadChatError(BadSampleError):
    """A chat sample whose messages.json is malformed (not a list of turns, unknown role, no assistant turn)."""


class EmptyTurnError(BadChatError):
    pass


class OverlongSampleError(BadSampleError):
    pass


class CorruptShardError(BadSampleError):
    """The shard itself is short, corrupt or unreadable (checked against its manifest, data/shard_reader.py); key
    is '*' and `n_lost` the number of samples lost with it (what the skip counts add)."""

    def __init__(self, shard: str, reason: str, n_lost: int = 1):
        lost = f"; {n_lost} sample(s) lost" if n_lost else "; no sample lost"
        ValueError.__init__(self, f"corrupt shard {shard}: {reason}{lost}")
        self.key, self.shard, self.reason, self.n_lost = "*", shard, reason, int(n_lost)


# ---------------------------------------------------------------------------------------------- policy
def skip_reason(error: BadSampleError) -> str:
    """Metric-friendly name of a bad-sample kind: UndecodableAudioError -> 'undecodable_audio'."""
    name = type(error).__name__.removesuffix("Error") or "bad_sample"
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


class BadSamplePolicy:
    """'raise' re-raises the BadSampleError; 'skip' counts it (`take()` hands the count to the next batch,
    `take_reasons()` the same skips by kind, e.g. {'undecodable_audio': 2}, `take_rows()` one (shard, key, kind,
    samples, detail) row per event for the run's skipped.tsv).

    A sample is counted once per pass: a stream that reads the same shards again within one pass (the demo
    stream within an epoch) or that meets the same bad sample twice does not count it again; a stream that
    tracks passes itself sets `current_pass` (the general pipeline: one pass = one read of a source's shards).
    A corrupt shard counts the samples lost with it (CorruptShardError.n_lost)."""

    def __init__(self, mode: OnBadSample = "skip", max_warnings: int = 5):
        if mode not in ("skip", "raise"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {mode!r}")
        self.mode = mode
        self.max_warnings = max_warnings
        self.pending = 0
        self.total = 0
        self.pending_reasons: dict[str, int] = {}
        self.total_reasons: dict[str, int] = {}
        self.pending_rows: list[tuple[str, str, str, int, str]] = []
        self.current_pass: Any = None
        self._seen: set[tuple] = set()
        self._warned = 0

    def handle(self, error: BadSampleError) -> None:
        if self.mode == "raise":
            raise error
        reason = skip_reason(error)
        seen = (self.current_pass, error.shard, error.key, reason, getattr(error, "reason", ""))
        if seen in self._seen:
            return  # the same bad sample met again in this pass: skipped, already counted
        self._seen.add(seen)
        n = error.n_lost if isinstance(error, CorruptShardError) else 1
        self.pending += n
        self.total += n
        if n:
            self.pending_reasons[reason] = self.pending_reasons.get(reason, 0) + n
            self.total_reasons[reason] = self.total_reasons.get(reason, 0) + n
        self.pending_rows.append((str(error.shard), str(error.key), reason, n, str(getattr(error, "reason", ""))))
        self._warned += 1
        if self._warned <= self.max_warnings:
            log.warning("skipping %s%s", error,
                        " (further skips are only counted)" if self._warned == self.max_warnings else "")

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n

    def take_reasons(self) -> dict[str, int]:
        reasons, self.pending_reasons = self.pending_reasons, {}
        return reasons

    def take_rows(self) -> list[tuple[str, str, str, int, str]]:
        rows, self.pending_rows = self.pending_rows, []
        return rows


# ---------------------------------------------------------------------------------------------- records
@dataclass
class SpeechRecord:
    key: str
    shard: str
    transcript: str
    units: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    audio: Any = None  # decoded waveform [T] at the corpus rate, only when asked for (continuous audio input)


@dataclass
class TextRecord:
    key: str
    shard: str
    text: str


def _member(sample: dict, name: str, key: str, shard: str) -> bytes:
    if name not in sample:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise MissingMemberError(key, shard, f"no '{name}' member (has {present})")
    return sample[name]


def _transcript(sample: dict, key: str, shard: str) -> str:
    try:
        text = _member(sample, TEXT_MEMBER, key, shard).decode("utf-8").strip()
    except UnicodeDecodeError as exn:
        raise TranscriptEncodingError(key, shard, f"transcript is not UTF-8 ({exn}); re-encode it as UTF-8") from exn
    if not text:
        raise EmptyTranscriptError(key, shard, "empty transcript")
    return text


def _meta(sample: dict, key: str, shard: str) -> dict[str, Any]:
    raw = sample.get(META_MEMBER)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exn:
        raise BadSampleError(key, shard, f"metadata is not JSON ({exn})") from exn
    if not isinstance(meta, dict):
        raise BadSampleError(key, shard, "metadata JSON is not an object")
    return meta


def decode_speech_sample(
    sample: dict,
    n_units: int,
    dedup: bool = True,
    verify_audio: VerifyAudio = "header",
    sample_rate: int = TARGET_SAMPLE_RATE,
    keep_audio: bool = False,
) -> SpeechRecord:
    """Validate and decode one raw webdataset speech sample (member name -> bytes). Raises BadSampleError.
    keep_audio: also decode the waveform into `record.audio` (implies verify_audio='full')."""
    key, shard = sample.get("__key__", "?"), sample.get("__url__", "?")
    transcript = _transcript(sample, key, shard)
    meta = _meta(sample, key, shard)
    wave = None
    if keep_audio:
        verify_audio = "full"
    if verify_audio != "none":
        wave = check_audio(_member(sample, AUDIO_MEMBER, key, shard), key, shard, verify_audio, sample_rate)
    if "sample_rate" in meta and meta["sample_rate"] != sample_rate:
        raise WrongSampleRateError(key, shard, f"metadata says {meta['sample_rate']} Hz, expected {sample_rate} Hz")
    units = read_units(_member(sample, UNITS_MEMBER, key, shard), n_units, key, shard, UNITS_MEMBER, dedup)
    return SpeechRecord(key, shard, transcript, units, meta, wave if keep_audio else None)


def check_audio(audio: bytes, key: str, shard: str, verify_audio: VerifyAudio = "header",
                sample_rate: int = TARGET_SAMPLE_RATE, member: str = AUDIO_MEMBER) -> np.ndarray | None:
    """Decodable ('header': the header only; 'full': every sample), mono, at `sample_rate`; else BadSampleError.
    Returns the decoded waveform for 'full' (None for 'header')."""
    wave = None
    try:
        info = audio_info(audio, name=f"{key}.{member}")
        if verify_audio == "full":
            wave, _ = read_audio(audio, target_sample_rate=None, name=f"{key}.{member}")
    except AudioDecodeError as exn:
        raise UndecodableAudioError(key, shard, f"{member}: {exn.reason}") from exn
    if info.samplerate != sample_rate:
        raise WrongSampleRateError(key, shard, f"{member} is {info.samplerate} Hz, expected {sample_rate} Hz")
    if info.channels != 1:
        raise NotMonoAudioError(key, shard, f"{member} has {info.channels} channels, expected mono "
                                            "(re-prepare the shard with a mono downmix)")
    return wave


def read_units(raw: bytes, n_units: int, key: str, shard: str, member: str = UNITS_MEMBER,
               dedup: bool = True) -> list[int]:
    """A .npy of unit ids (no pickle) -> list, checked to be 1-D, non-empty, integer, inside [0, n_units)."""
    try:
        units = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as exn:
        raise InvalidUnitsError(key, shard, f"cannot read {member} ({exn})") from exn
    if units.ndim != 1 or units.size == 0 or not np.issubdtype(units.dtype, np.integer):
        raise InvalidUnitsError(key, shard, f"{member} must be a non-empty 1-D integer array, got {units.dtype} {units.shape}")
    if units.min() < 0 or units.max() >= n_units:
        raise InvalidUnitsError(key, shard, f"{member} unit ids span [{units.min()}, {units.max()}], outside [0, {n_units})")
    unit_list = units.astype(np.int64).tolist()
    return dedup_units(unit_list) if dedup else unit_list


def decode_text_sample(sample: dict) -> TextRecord:
    key, shard = sample.get("__key__", "?"), sample.get("__url__", "?")
    return TextRecord(key, shard, _transcript(sample, key, shard))


# ---------------------------------------------------------------------------------------------- reading
def iter_shard(shard: str, policy: BadSamplePolicy, verify: VerifyShards = "size",
               owns: Callable[[int], bool] | None = None) -> Iterator[dict]:
    """Whole raw samples of one .tar shard (data/shard_reader.py); a short, corrupt or unreadable shard goes
    through `policy` as one CorruptShardError with the number of samples lost (those `owns` says are this
    reader's). verify: 'size' (manifest size and count), 'sha256' (also the checksum) or 'none'."""

    def on_corrupt(reason: str, n_lost: int) -> None:
        policy.handle(CorruptShardError(shard, reason, n_lost))

    yield from read_shard_samples(shard, on_corrupt, verify, owns, stop_at_open=policy.mode == "raise")


def iter_records(
    shards: list[str], decode: Callable[[dict], Any], policy: BadSamplePolicy, stride: int = 1, offset: int = 0,
    verify: VerifyShards = "size",
) -> Iterator[Any]:
    """Decoded records of `shards` in order (only samples offset, offset+stride, ... when stride > 1);
    bad samples raise or are counted by `policy`."""
    index = -1
    for shard in shards:
        base = index + 1  # the raw index of this shard's first sample in the pass (its lost samples' owner)
        for sample in iter_shard(shard, policy, verify, lambda i, b=base: (b + i) % stride == offset):
            index += 1
            if index % stride != offset:
                continue
            try:
                yield decode(sample)
            except BadSampleError as error:
                policy.handle(error)
