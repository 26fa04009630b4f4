"""A vocoder that needs no training: the mean log-mel spectrogram of each unit, measured on training audio,
inverted with torchaudio's InverseMelScale + Griffin-Lim. It makes every unit sound like its average, so
its speech is rough; it exists so that the TTS path (text -> units -> waveform -> recogniser -> WER) runs
anywhere. Units are at 25 Hz (hop 640 at 16 kHz); each unit stores `sub_frames` mel frames (hop 640 /
sub_frames), and, for deduplicated input, its mean run length in the training audio (the duration model).

    vocoder = MeanMelVocoder.fit(pairs_of_wave_and_units, n_units=500); vocoder.save(dir)
    wave = MeanMelVocoder.load(dir)(units, deduplicated=True)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
import torchaudio
from safetensors.torch import load_file, save_file

CONFIG_FILE, TENSORS_FILE = "mean_mel_vocoder.json", "mean_mel_vocoder.safetensors"


class UnitVocabularyMismatchError(ValueError):
    """The vocoder was built for another number of units than the model's tokenizer has."""


@dataclass(frozen=True)
class MeanMelConfig:
    n_units: int = 500
    sample_rate: int = 16_000
    unit_hop: int = 640  # samples per unit frame (25 Hz)
    sub_frames: int = 4  # mel frames per unit frame (hop 160)
    n_fft: int = 1024
    win_length: int = 400
    n_mels: int = 80
    griffin_lim_iters: int = 32

    @property
    def hop(self) -> int:
        return self.unit_hop // self.sub_frames


def check_unit_vocabulary(vocoder_units: int, model_units: int, what: str = "vocoder") -> None:
    if vocoder_units != model_units:
        raise UnitVocabularyMismatchError(
            f"the {what} was built for {vocoder_units} units but the model's tokenizer has {model_units} unit "
            f"tokens: use a {what} fitted on this corpus' units (same unit extractor / k-means)")


class LogMelToWave:
    """log-mel frames [frames, n_mels] -> waveform: InverseMelScale, then Griffin-Lim from fixed random phases (the
    same frames always give the same audio), peak-normalised to 0.9. Shared by the CPU vocoders."""

    def __init__(self, sample_rate: int, n_fft: int, n_mels: int, win_length: int, hop_length: int, iters: int):
        self.inverse_mel = torchaudio.transforms.InverseMelScale(n_fft // 2 + 1, n_mels, sample_rate)
        self.griffin_lim = torchaudio.transforms.GriffinLim(n_fft, n_iter=iters, win_length=win_length,
                                                            hop_length=hop_length, power=1.0)

    @torch.no_grad()
    def __call__(self, log_mel: torch.Tensor) -> torch.Tensor:
        magnitude = self.inverse_mel(torch.exp(log_mel).T)  # [n_fft/2+1, frames]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            wave = self.griffin_lim(magnitude)
        return wave / wave.abs().max().clamp(min=1e-4) * 0.9


class MeanMelVocoder:
    def __init__(self, config: MeanMelConfig, mean_log_mel: torch.Tensor, mean_duration: torch.Tensor):
        if mean_log_mel.shape != (config.n_units, config.sub_frames, config.n_mels):
            raise ValueError(f"mean_log_mel has shape {tuple(mean_log_mel.shape)}, expected "
                             f"{(config.n_units, config.sub_frames, config.n_mels)}")
        self.config, self.mean_log_mel, self.mean_duration = config, mean_log_mel, mean_duration
        c = config
        self.mel = torchaudio.transforms.MelSpectrogram(c.sample_rate, n_fft=c.n_fft, win_length=c.win_length,
                                                        hop_length=c.hop, n_mels=c.n_mels, power=1.0, center=True)
        self.to_wave = LogMelToWave(c.sample_rate, c.n_fft, c.n_mels, c.win_length, c.hop, c.griffin_lim_iters)

    @property
    def n_units(self) -> int:
        return self.config.n_units

    @classmethod
    @torch.no_grad()
    def fit(cls, pairs: Iterable[tuple[torch.Tensor, list[int]]], n_units: int,
            config: MeanMelConfig | None = None) -> "MeanMelVocoder":
        """pairs: (16 kHz waveform [T], its NON-deduplicated 25 Hz units). Units never seen get the global mean."""
        c = config or MeanMelConfig(n_units=n_units)
        if c.n_units != n_units:
            raise ValueError(f"config.n_units={c.n_units} but n_units={n_units}")
        mel = torchaudio.transforms.MelSpectrogram(c.sample_rate, n_fft=c.n_fft, win_length=c.win_length,
                                                   hop_length=c.hop, n_mels=c.n_mels, power=1.0, center=True)
        sums = torch.zeros(n_units, c.sub_frames, c.n_mels, dtype=torch.float64)
        counts = torch.zeros(n_units, dtype=torch.float64)
        run_sum, run_count = torch.zeros(n_units, dtype=torch.float64), torch.zeros(n_units, dtype=torch.float64)
        for wave, units in pairs:
            log_mel = torch.log(mel(wave.float()).T + 1e-5)  # [frames, n_mels]
            n = min(len(units), log_mel.shape[0] // c.sub_frames)
            if n == 0:
                continue
            u = torch.as_tensor(list(units[:n]), dtype=torch.long)
            frames = log_mel[: n * c.sub_frames].reshape(n, c.sub_frames, c.n_mels).double()
            sums.index_add_(0, u, frames)
            counts.index_add_(0, u, torch.ones(n, dtype=torch.float64))
            change = torch.ones(n, dtype=torch.bool)
            change[1:] = u[1:] != u[:-1]
            starts = torch.nonzero(change).flatten()
            lengths = torch.diff(torch.cat((starts, torch.tensor([n])))).double()
            run_sum.index_add_(0, u[starts], lengths)
            run_count.index_add_(0, u[starts], torch.ones_like(lengths))
        if counts.sum() == 0:
            raise ValueError("MeanMelVocoder.fit got no usable (waveform, units) pair")
        global_mean = sums.sum(0) / counts.sum()
        means = torch.where(counts[:, None, None] > 0, sums / counts.clamp(min=1)[:, None, None], global_mean)
        durations = torch.where(run_count > 0, run_sum / run_count.clamp(min=1), torch.ones_like(run_sum))
        return cls(c, means.float(), durations.float())

    @torch.no_grad()
    def __call__(self, units: list[int] | torch.Tensor, deduplicated: bool = True) -> torch.Tensor:
        """Unit ids -> waveform [T] at config.sample_rate (deduplicated units are expanded by mean run length)."""
        u = torch.as_tensor(units, dtype=torch.long).flatten()
        if u.numel() == 0:
            return torch.zeros(0)
        if int(u.min()) < 0 or int(u.max()) >= self.n_units:
            raise UnitVocabularyMismatchError(f"unit ids span [{int(u.min())}, {int(u.max())}] but the vocoder "
                                              f"knows {self.n_units} units")
        if deduplicated:
            u = u.repeat_interleave(self.mean_duration[u].round().clamp(min=1).long())
        return self.to_wave(self.mean_log_mel[u].reshape(-1, self.config.n_mels))  # [frames, n_mels]

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({"mean_log_mel": self.mean_log_mel.contiguous(), "mean_duration": self.mean_duration.contiguous()},
                  str(d / TENSORS_FILE))
        (d / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "MeanMelVocoder":
        d = Path(directory)
        if not (d / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{d}: no {CONFIG_FILE}; write one with MeanMelVocoder.fit(...).save(dir)")
        tensors = load_file(str(d / TENSORS_FILE))
        return cls(MeanMelConfig(**json.loads((d / CONFIG_FILE).read_text())), tensors["mean_log_mel"],
                   tensors["mean_duration"])
