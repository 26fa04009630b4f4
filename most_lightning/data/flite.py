"""flite text-to-speech: the offline source of real English speech for the demo corpus."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache

# Mean F0 (Hz) of each voice's default prosody (measured); pitch variation scales it. rms ignores the setting.
DEFAULT_F0 = {"slt": 170.0, "awb": 135.0, "kal16": 100.0, "kal": 100.0}
INSTALL_HINT = "install it with `sudo apt-get install flite` (setup.sh does this)"


class FliteNotFoundError(RuntimeError):
    pass


def flite_binary() -> str:
    path = shutil.which("flite")
    if path is None:
        raise FliteNotFoundError(f"the `flite` text-to-speech program is not on PATH: {INSTALL_HINT}")
    return path


@lru_cache(maxsize=None)
def _voices(binary: str) -> tuple[str, ...]:
    out = subprocess.run([binary, "-lv"], capture_output=True, text=True, check=True).stdout
    return tuple(out.split(":", 1)[-1].split())


def available_voices() -> tuple[str, ...]:
    return _voices(flite_binary())


def check_voices(voices: list[str] | tuple[str, ...]) -> None:
    have = available_voices()
    missing = [v for v in voices if v not in have]
    if missing:
        raise FliteNotFoundError(f"flite lacks voice(s) {missing}; it has {list(have)}")


@dataclass(frozen=True)
class Utterance:
    key: str
    text: str  # what flite reads (original spelling and punctuation)
    transcript: str  # normalised target text
    voice: str
    duration_stretch: float = 1.0
    f0_scale: float = 1.0


def synthesize(utt: Utterance, wav_path: str, binary: str | None = None) -> str:
    """Write utt's speech to wav_path; return flite's phone alignment ("pau:0.17 dh:0.22 ...", end times in s)."""
    cmd = [binary or flite_binary(), "-psdur", "-voice", utt.voice, "--setf", f"duration_stretch={utt.duration_stretch}"]
    if utt.voice in DEFAULT_F0 and utt.f0_scale != 1.0:
        cmd += ["--setf", f"int_f0_target_mean={DEFAULT_F0[utt.voice] * utt.f0_scale:.1f}"]
    cmd += ["-t", utt.text, "-o", wav_path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"flite failed on {utt.key} (voice {utt.voice}): {proc.stderr.strip()[:300]}")
    return " ".join(proc.stdout.split())
