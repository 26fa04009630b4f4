"""Pluggable text-to-speech for rendering chat turns as speech.

A TTS is any callable `tts(text, key) -> (float32 mono waveform, sample_rate)` with a `name` attribute.
Specs on the command line (`--tts`):
    flite                 flite, voices slt/rms/awb/kal16 chosen per turn from a hash of its key (deterministic)
    flite:slt,awb         flite with these voices
    package.module:maker  maker(arg) builds your TTS; `package.module:maker:arg` passes the string "arg"
"""

from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
from functools import lru_cache
from typing import Callable, Protocol

import numpy as np
import soundfile as sf

from ..flite import Utterance, check_voices, flite_binary, synthesize

DEFAULT_FLITE_VOICES = ("slt", "rms", "awb", "kal16")


class TTS(Protocol):
    name: str

    def __call__(self, text: str, key: str) -> tuple[np.ndarray, int]: ...


class FliteTTS:
    """flite voices picked per turn by a hash of its key: the same chat always gets the same voices."""

    def __init__(self, voices: tuple[str, ...] = DEFAULT_FLITE_VOICES):
        self.binary = flite_binary()
        check_voices(voices)
        self.voices = tuple(voices)
        self.name = "flite:" + ",".join(self.voices)
        self._tmp = tempfile.mkdtemp(prefix="most_tts_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)

    def __call__(self, text: str, key: str) -> tuple[np.ndarray, int]:
        digest = int(hashlib.sha256(key.encode()).hexdigest(), 16)
        voice = self.voices[digest % len(self.voices)]
        wav = os.path.join(self._tmp, "turn.wav")
        synthesize(Utterance(key=key, text=text, transcript=text, voice=voice), wav, self.binary)
        wave, rate = sf.read(wav, dtype="float32", always_2d=False)
        return wave, rate


@lru_cache(maxsize=4)
def get_tts(spec: str) -> TTS:
    name, _, arg = spec.partition(":")
    if name == "flite":
        return FliteTTS(tuple(v for v in arg.split(",") if v) or DEFAULT_FLITE_VOICES)
    if "." in name and arg:  # package.module:factory[:arg]
        factory_name, _, factory_arg = arg.partition(":")
        factory: Callable[..., TTS] = getattr(importlib.import_module(name), factory_name)
        return factory(factory_arg) if factory_arg else factory()
    raise ValueError(f"unknown TTS {spec!r}: use 'flite', 'flite:voice1,voice2' or 'package.module:factory'")
