"""Unit-to-speech that trains in minutes on the CPU: units with durations -> log-mel frames -> waveform.

Phone-like units (one unit per phone after dedup) say what is spoken but not for how long, and one mean mel frame
per unit (MeanMelVocoder) averages every voice, pitch and context into a buzz no recogniser understands. Here:
- durations: each unit keeps its run length (true units, not deduplicated) or gets its mean run length in the
  vocoder's training audio (`DurationTable`, for a model's deduplicated output);
- a small non-adversarial decoder (`UnitMelDecoder`: unit embedding + where the frame sits in its run, a stack of
  residual 1-D convolutions for context) predicts the log-mel frames of ONE voice, trained with an L1 loss on
  speech of that voice (flite, fixed pitch and speed, so the harmonics it learns are consistent);
- InverseMelScale + Griffin-Lim (torchaudio) turn the mel frames into a waveform.

    vocoder = fit_unit_mel_vocoder(pairs_of_wave_and_units, UnitMelConfig(n_units=64, channels=192, layers=6))
    vocoder.save(dir); wave = UnitMelVocoder.load(dir)(units, deduplicated=True)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torchaudio
from safetensors.torch import load_file, save_file
from torch import nn

from .mean_mel_vocoder import LogMelToWave, UnitVocabularyMismatchError

CONFIG_FILE, TENSORS_FILE = "unit_mel_vocoder.json", "unit_mel_vocoder.safetensors"
LOG_FLOOR = 1e-5


@dataclass(frozen=True)
class UnitMelConfig:
    n_units: int
    channels: int  # decoder width and depth: conf/eval/tasks/tts.yaml's unit_mel vocoder holds the values used
    layers: int
    sample_rate: int = 16_000
    unit_hop: int = 320  # samples per unit frame: the unit extractor's rate (320 = 50 Hz, 640 = 25 Hz)
    mel_hop: int = 160  # samples per mel frame; unit_hop must be a multiple of it
    n_fft: int = 1024
    win_length: int = 400
    n_mels: int = 80
    kernel_size: int = 5
    griffin_lim_iters: int = 32

    def __post_init__(self):
        if self.n_units < 1:
            raise ValueError(f"UnitMelConfig.n_units must be >= 1, got {self.n_units}")
        if self.mel_hop < 1 or self.unit_hop % self.mel_hop:
            raise ValueError(f"UnitMelConfig.unit_hop ({self.unit_hop}) must be a positive multiple of mel_hop "
                             f"({self.mel_hop})")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"UnitMelConfig.kernel_size must be odd, got {self.kernel_size}")

    @property
    def sub_frames(self) -> int:
        return self.unit_hop // self.mel_hop


# ---------------------------------------------------------------------------------------------- durations
def run_lengths(units: Sequence[int] | torch.Tensor) -> tuple[list[int], list[int]]:
    """[5, 5, 7, 5, 5, 5] -> ([5, 7, 5], [2, 1, 3]): the deduplicated units and how long each lasted."""
    values: list[int] = []
    lengths: list[int] = []
    for u in (units.tolist() if isinstance(units, torch.Tensor) else units):
        if values and values[-1] == u:
            lengths[-1] += 1
        else:
            values.append(int(u))
            lengths.append(1)
    return values, lengths


def expand_units(units: torch.Tensor, durations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deduplicated units [N] with durations [N] (frames, >= 1) -> frame units [sum(durations)] and, per frame,
    [position within its run in (0, 1), log of the run length] (what the decoder needs to shape a phone)."""
    units, durations = torch.as_tensor(units, dtype=torch.long), torch.as_tensor(durations, dtype=torch.long)
    if units.shape != durations.shape or units.dim() != 1:
        raise ValueError(f"units {tuple(units.shape)} and durations {tuple(durations.shape)} must be equal 1-D shapes")
    if units.numel() and int(durations.min()) < 1:
        raise ValueError(f"every duration must be >= 1 frame, got min {int(durations.min())}")
    frames = units.repeat_interleave(durations)
    length = durations.repeat_interleave(durations).float()
    starts = torch.cumsum(durations, 0) - durations
    index = torch.arange(frames.numel()) - starts.repeat_interleave(durations)
    position = (index.float() + 0.5) / length
    return frames, torch.stack([position, torch.log(length)], dim=-1)


class DurationTable:
    """Mean run length of each unit (in unit frames) in the training audio; unseen units get the global mean."""

    def __init__(self, mean_frames: torch.Tensor):
        self.mean_frames = mean_frames.float()

    @classmethod
    def fit(cls, unit_sequences: Sequence[Sequence[int]], n_units: int) -> "DurationTable":
        total = torch.zeros(n_units, dtype=torch.float64)
        count = torch.zeros(n_units, dtype=torch.float64)
        for seq in unit_sequences:
            values, lengths = run_lengths(seq)
            if values:
                v = torch.tensor(values)
                total.index_add_(0, v, torch.tensor(lengths, dtype=torch.float64))
                count.index_add_(0, v, torch.ones(len(v), dtype=torch.float64))
        if count.sum() == 0:
            raise ValueError("DurationTable.fit got no units")
        global_mean = total.sum() / count.sum()
        return cls(torch.where(count > 0, total / count.clamp(min=1), global_mean))

    def __call__(self, units: torch.Tensor) -> torch.Tensor:
        return self.mean_frames[units].round().clamp(min=1).long()


# ---------------------------------------------------------------------------------------------- mel decoder
class _ResidualConv(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation)
        self.norm = nn.GroupNorm(1, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.norm(self.conv(x)))


class UnitMelDecoder(nn.Module):
    """Frame units [B, F] + run features [B, F, 2] -> log-mel [B, F * sub_frames, n_mels]."""

    def __init__(self, config: UnitMelConfig):
        super().__init__()
        c = config
        self.config = c
        self.embed = nn.Embedding(c.n_units, c.channels)
        self.run_features = nn.Linear(2, c.channels)
        self.blocks = nn.Sequential(*[_ResidualConv(c.channels, c.kernel_size, 2 ** (i % 3)) for i in range(c.layers)])
        self.out = nn.Linear(c.channels, c.sub_frames * c.n_mels)

    def forward(self, frame_units: torch.Tensor, run_features: torch.Tensor) -> torch.Tensor:
        x = self.embed(frame_units) + self.run_features(run_features)  # [B, F, C]
        x = self.blocks(x.transpose(1, 2)).transpose(1, 2)
        b, f, _ = x.shape
        return self.out(x).view(b, f * self.config.sub_frames, self.config.n_mels)


# ---------------------------------------------------------------------------------------------- vocoder
class UnitMelVocoder:
    def __init__(self, config: UnitMelConfig, decoder: UnitMelDecoder, durations: DurationTable):
        self.config, self.decoder, self.durations = config, decoder.eval(), durations
        c = config
        self.to_wave = LogMelToWave(c.sample_rate, c.n_fft, c.n_mels, c.win_length, c.mel_hop, c.griffin_lim_iters)

    @property
    def n_units(self) -> int:
        return self.config.n_units

    def _check(self, u: torch.Tensor) -> None:
        if int(u.min()) < 0 or int(u.max()) >= self.n_units:
            raise UnitVocabularyMismatchError(f"unit ids span [{int(u.min())}, {int(u.max())}] but the vocoder "
                                              f"knows {self.n_units} units")

    @torch.no_grad()
    def log_mel(self, units: Sequence[int] | torch.Tensor, deduplicated: bool = True,
                durations: Sequence[int] | None = None) -> torch.Tensor:
        """Unit ids -> log-mel [frames, n_mels]. deduplicated=False: repeated ids are runs (their true durations);
        deduplicated=True: durations from `durations` or, if None, the DurationTable."""
        u = torch.as_tensor(units, dtype=torch.long).flatten()
        if u.numel() == 0:
            return torch.zeros(0, self.config.n_mels)
        self._check(u)
        if not deduplicated:
            values, lengths = run_lengths(u)
            u, d = torch.tensor(values), torch.tensor(lengths)
        else:
            d = self.durations(u) if durations is None else torch.as_tensor(durations, dtype=torch.long)
        frames, feats = expand_units(u, d)
        return self.decoder(frames[None], feats[None])[0]

    @torch.no_grad()
    def __call__(self, units: Sequence[int] | torch.Tensor, deduplicated: bool = True,
                 durations: Sequence[int] | None = None) -> torch.Tensor:
        """Unit ids -> waveform [T] at config.sample_rate."""
        log_mel = self.log_mel(units, deduplicated, durations)
        if log_mel.numel() == 0:
            return torch.zeros(0)
        return self.to_wave(log_mel)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"decoder.{k}": v.contiguous() for k, v in self.decoder.state_dict().items()}
        tensors["durations.mean_frames"] = self.durations.mean_frames.contiguous()
        save_file(tensors, str(d / TENSORS_FILE))
        (d / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "UnitMelVocoder":
        d = Path(directory)
        if not (d / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{d}: no {CONFIG_FILE}; write one with fit_unit_mel_vocoder(...).save(dir)")
        config = UnitMelConfig(**json.loads((d / CONFIG_FILE).read_text()))
        tensors = load_file(str(d / TENSORS_FILE))
        decoder = UnitMelDecoder(config)
        decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in tensors.items() if k.startswith("decoder.")})
        return cls(config, decoder, DurationTable(tensors["durations.mean_frames"]))


# ---------------------------------------------------------------------------------------------- training
def mel_target(wave: torch.Tensor, config: UnitMelConfig, mel: nn.Module | None = None) -> torch.Tensor:
    """The log-mel frames [frames, n_mels] the decoder learns to predict (magnitude mel, center=True)."""
    c = config
    mel = mel or torchaudio.transforms.MelSpectrogram(c.sample_rate, n_fft=c.n_fft, win_length=c.win_length,
                                                      hop_length=c.mel_hop, n_mels=c.n_mels, power=1.0)
    return torch.log(mel(wave.float()).T + LOG_FLOOR)


def _training_items(pairs, config: UnitMelConfig) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    c = config
    mel = torchaudio.transforms.MelSpectrogram(c.sample_rate, n_fft=c.n_fft, win_length=c.win_length,
                                               hop_length=c.mel_hop, n_mels=c.n_mels, power=1.0)
    items = []
    for wave, units in pairs:
        target = mel_target(wave, c, mel)
        n = min(len(units), target.shape[0] // c.sub_frames)
        if n == 0:
            continue
        values, lengths = run_lengths(list(units)[:n])
        frames, feats = expand_units(torch.tensor(values), torch.tensor(lengths))
        items.append((frames, feats, target[: n * c.sub_frames]))
    if not items:
        raise ValueError("fit_unit_mel_vocoder got no usable (waveform, units) pair")
    return items


def fit_unit_mel_vocoder(pairs: Sequence[tuple[torch.Tensor, Sequence[int]]], config: UnitMelConfig,
                         steps: int = 600, batch_size: int = 16, lr: float = 2e-3, seed: int = 0,
                         on_step: Callable[[int, float], None] | None = None) -> UnitMelVocoder:
    """Train the mel decoder on (16 kHz waveform [T], its NON-deduplicated units) pairs of one voice; the durations
    table comes from the same units. AdamW with cosine decay, L1 on log-mel over the real (unpadded) frames."""
    items = _training_items(pairs, config)
    durations = DurationTable.fit([f[0].tolist() for f in items], config.n_units)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = UnitMelDecoder(config)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.0)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    decoder.train()
    sub = config.sub_frames
    for step in range(steps):
        pick = torch.randint(len(items), (min(batch_size, len(items)),), generator=generator).tolist()
        longest = max(items[i][0].numel() for i in pick)
        units = torch.zeros(len(pick), longest, dtype=torch.long)
        feats = torch.zeros(len(pick), longest, 2)
        target = torch.zeros(len(pick), longest * sub, config.n_mels)
        mask = torch.zeros(len(pick), longest * sub, 1)
        for row, i in enumerate(pick):
            f, x, t = items[i]
            units[row, : f.numel()], feats[row, : f.numel()] = f, x
            target[row, : t.shape[0]], mask[row, : t.shape[0]] = t, 1.0
        loss = ((decoder(units, feats) - target).abs() * mask).sum() / (mask.sum() * config.n_mels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step, loss.item())
    return UnitMelVocoder(config, decoder.eval(), durations)
