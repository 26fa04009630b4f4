"""Items -> WebDataset samples (member name -> bytes), run inside worker processes.

Speech (the schema of data/samples.py): `flac` 16 kHz mono 16-bit, `txt` normalised transcript, `json`
metadata, `units.npy` (int16, 25 Hz, not deduplicated) when a unit extractor is given.
Text: `txt`, `json`. Chat: `json` (source, split, n_turns) and `messages.json` = [{"role", "text", "audio",
"units"}], audio in `turn{i}.flac`, units in `turn{i}.units.npy` (i = index in messages).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import soundfile as sf
import torch

from ...audio.io import TARGET_SAMPLE_RATE, encode_audio, resample
from ..text_sources import normalize_transcript
from .common import ChatItem, Item, Skip, SpeechItem, TextItem


@dataclass(frozen=True)
class BuildOptions:
    """Everything besides the items that changes the bytes of a sample (part of the plan hash)."""

    source: str
    units: str | None = None  # directory of a fitted UnitExtractor
    normalize_text: bool = True  # txt = normalize_transcript(text); the original stays in json "text"
    tts: str | None = None  # chat: TTS spec ("flite", "flite:slt,rms", "module:factory"); None = text only
    speak_roles: tuple[str, ...] = ("user", "assistant")
    max_speak_chars: int = 600
    extra: dict[str, Any] = field(default_factory=dict)

    def canonical(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["speak_roles"] = list(self.speak_roles)
        d["units"] = _units_fingerprint(self.units) if self.units else None
        return d


def _units_fingerprint(directory: str) -> str:
    """The extractor's files' content, not its path, decides the units."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for f in sorted(Path(directory).iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=4)
def _extractor(directory: str):
    from ...audio.units import UnitExtractor

    return UnitExtractor.load(directory)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")


def load_clip(path: str, start: float = 0.0, duration: float | None = None) -> tuple[np.ndarray, int, int]:
    """(mono float32 samples, sample rate, channels) of a file or a [start, start+duration) segment of it."""
    if not os.path.isfile(path):
        raise Skip("missing_audio", f"no file {path}")
    try:
        with sf.SoundFile(path) as f:
            rate, channels = f.samplerate, f.channels
            first = int(round(start * rate))
            frames = -1 if duration is None else int(round(duration * rate))
            if duration is not None and f.frames > 0 and first + frames > f.frames + rate // 100:
                raise Skip("segment_out_of_range", f"{path}: segment [{start:.2f}, {start + duration:.2f}) s ends "
                                                   f"after the recording ({f.frames / rate:.2f} s)")
            if first:
                f.seek(first)
            data = f.read(frames, dtype="float32", always_2d=True)
    except Skip:
        raise
    except Exception as exn:  # soundfile: LibsndfileError, RuntimeError, TypeError on garbage
        raise Skip("undecodable_audio", f"{path}: {exn}") from exn
    if data.shape[0] == 0:
        raise Skip("empty_audio", f"{path}: no samples" + (f" in [{start}, +{duration}) s" if duration else ""))
    if not np.isfinite(data).all():
        raise Skip("undecodable_audio", f"{path}: decoded samples are not finite")
    return data, rate, channels


def build_speech(item: SpeechItem, opts: BuildOptions, fixed: dict[str, int]) -> dict[str, bytes]:
    data, rate, channels = load_clip(item.audio, item.start, item.duration)
    wave = data.mean(axis=1) if channels > 1 else data[:, 0]
    if channels > 1:
        fixed["downmixed"] = fixed.get("downmixed", 0) + 1
    wave_t = torch.from_numpy(np.ascontiguousarray(wave))
    if rate != TARGET_SAMPLE_RATE:
        wave_t = resample(wave_t, rate, TARGET_SAMPLE_RATE)
        fixed["resampled"] = fixed.get("resampled", 0) + 1
    transcript = normalize_transcript(item.text) if opts.normalize_text else item.text
    if not transcript:
        raise Skip("empty_transcript", f"{item.text!r} has no words after normalisation")
    meta = {"key": item.key, "source": opts.source, "text": item.text, "sample_rate": TARGET_SAMPLE_RATE,
            "source_sample_rate": rate, "source_channels": channels,
            "duration": round(len(wave_t) / TARGET_SAMPLE_RATE, 4), **item.meta}
    sample = {"__key__": item.key, "flac": encode_audio(wave_t, TARGET_SAMPLE_RATE),
              "txt": transcript.encode("utf-8"), "json": _json(meta)}
    if opts.units:
        sample["units.npy"] = _npy(_extractor(opts.units)(wave_t).numpy().astype(np.int16))
    return sample


def build_text(item: TextItem, opts: BuildOptions) -> dict[str, bytes]:
    text = normalize_transcript(item.text) if opts.normalize_text else item.text
    if not text:
        raise Skip("empty_text", f"{item.text[:60]!r} has no words after normalisation")
    return {"__key__": item.key, "txt": text.encode("utf-8"),
            "json": _json({"key": item.key, "source": opts.source, **item.meta})}


def build_chat(item: ChatItem, opts: BuildOptions, fixed: dict[str, int]) -> tuple[dict[str, bytes], float]:
    """The chat sample and the seconds of speech rendered into it."""
    from .tts import get_tts

    tts = get_tts(opts.tts) if opts.tts else None
    sample: dict[str, bytes] = {"__key__": item.key}
    messages, seconds = [], 0.0
    for i, turn in enumerate(item.messages):
        entry = {"role": turn["role"], "text": turn["text"], "audio": None, "units": None}
        if tts is not None and turn["role"] in opts.speak_roles:
            if len(turn["text"]) > opts.max_speak_chars:
                fixed["not_spoken_too_long"] = fixed.get("not_spoken_too_long", 0) + 1
            else:
                wave, rate = tts(turn["text"], f"{item.key}/{i}")
                wave_t = torch.as_tensor(np.asarray(wave, dtype=np.float32))
                if rate != TARGET_SAMPLE_RATE:
                    wave_t = resample(wave_t, rate, TARGET_SAMPLE_RATE)
                entry["audio"] = f"turn{i}.flac"
                sample[entry["audio"]] = encode_audio(wave_t, TARGET_SAMPLE_RATE)
                seconds += len(wave_t) / TARGET_SAMPLE_RATE
                if opts.units:
                    entry["units"] = f"turn{i}.units.npy"
                    sample[entry["units"]] = _npy(_extractor(opts.units)(wave_t).numpy().astype(np.int16))
        messages.append(entry)
    meta = {"key": item.key, "source": opts.source, "n_turns": len(messages), **item.meta}
    if tts is not None:
        meta.update(tts=tts.name, duration=round(seconds, 4))
    sample["json"] = _json(meta)
    sample["messages.json"] = _json(messages)
    return sample, seconds


def build_sample(item: Item, opts: BuildOptions, fixed: dict[str, int]) -> tuple[dict[str, bytes], float]:
    """(sample, seconds of audio in it). Raises Skip for a bad input."""
    if isinstance(item, SpeechItem):
        sample = build_speech(item, opts, fixed)
        return sample, json.loads(sample["json"])["duration"]
    if isinstance(item, TextItem):
        return build_text(item, opts), 0.0
    if isinstance(item, ChatItem):
        return build_chat(item, opts, fixed)
    raise TypeError(f"unknown item type {type(item).__name__}")
