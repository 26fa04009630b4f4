"""Waveform I/O: decode anything soundfile reads, mix to mono, resample to the model's rate.

torchaudio 2.11 has no load/save any more (they need torchcodec + FFmpeg), so decoding goes through soundfile;
resampling stays in torchaudio.functional.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO, Literal

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

TARGET_SAMPLE_RATE = 16_000
MonoPolicy = Literal["mean", "first", "error"]
AudioSource = str | os.PathLike | bytes | BinaryIO


class AudioDecodeError(ValueError):
    """Audio bytes or a file that soundfile cannot decode; `source` names the file or sample key."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"cannot decode audio {source!r}: {reason}")
        self.source = source
        self.reason = reason


def _describe(source: AudioSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"<{type(source).__name__}>"


def _as_file(source: AudioSource):
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source


def audio_info(source: AudioSource, name: str | None = None) -> sf._SoundFileInfo:
    """Header only (sample rate, channels, frames): cheap validity check without decoding the samples."""
    try:
        return sf.info(_as_file(source))
    except Exception as exn:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioDecodeError(_describe(source, name), str(exn)) from exn


def to_mono(samples: np.ndarray, policy: MonoPolicy = "mean", name: str = "<audio>") -> np.ndarray:
    """[frames] or [frames, channels] -> [frames]. 'mean' averages channels, 'first' keeps channel 0."""
    if samples.ndim == 1:
        return samples
    if samples.shape[1] == 1:
        return samples[:, 0]
    if policy == "mean":
        return samples.mean(axis=1)
    if policy == "first":
        return samples[:, 0]
    raise AudioDecodeError(name, f"{samples.shape[1]} channels but mono policy is 'error' (use 'mean' or 'first')")


def read_audio(
    source: AudioSource,
    target_sample_rate: int | None = TARGET_SAMPLE_RATE,
    mono: MonoPolicy = "mean",
    name: str | None = None,
) -> tuple[torch.Tensor, int]:
    """Decode a path, bytes or file object into a float32 mono waveform [T] in [-1, 1].

    Resamples to `target_sample_rate` unless it is None. Returns (waveform, sample_rate).
    Raises AudioDecodeError naming `name` (or the path) when soundfile cannot decode it or it is empty.
    """
    label = _describe(source, name)
    try:
        samples, sample_rate = sf.read(_as_file(source), dtype="float32", always_2d=False)
    except Exception as exn:
        raise AudioDecodeError(label, str(exn)) from exn
    if samples.size == 0:
        raise AudioDecodeError(label, "no audio samples")
    wave = torch.from_numpy(np.ascontiguousarray(to_mono(samples, mono, label)))
    if target_sample_rate is not None and sample_rate != target_sample_rate:
        wave = resample(wave, sample_rate, target_sample_rate)
        sample_rate = target_sample_rate
    return wave, sample_rate


def resample(wave: torch.Tensor, orig_sample_rate: int, new_sample_rate: int) -> torch.Tensor:
    if orig_sample_rate == new_sample_rate:
        return wave
    return AF.resample(wave, orig_sample_rate, new_sample_rate)


def encode_audio(wave: torch.Tensor | np.ndarray, sample_rate: int, format: str = "FLAC") -> bytes:
    """Mono waveform -> compressed bytes (FLAC 16-bit by default)."""
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    buf = io.BytesIO()
    sf.write(buf, np.asarray(wave, dtype=np.float32), sample_rate, format=format, subtype="PCM_16")
    return buf.getvalue()
