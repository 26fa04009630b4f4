"""Unit HiFi-GAN vocoder in the fairseq / SpiritLM layout: a unit embedding table (+ optional speaker
embedding) feeds a HiFi-GAN generator; a duration predictor expands deduplicated units.

Checkpoints: a directory (or a file next to a `config.json`) holding
  config.json     fairseq CodeHiFiGAN keys: num_embeddings, embedding_dim, model_in_dim, upsample_rates,
                  upsample_kernel_sizes, upsample_initial_channel, resblock ("1"/"2"), resblock_kernel_sizes,
                  resblock_dilation_sizes, [multispkr, num_speakers], [dur_predictor_params{encoder_embed_dim,
                  var_pred_hidden_dim, var_pred_kernel_size, var_pred_dropout}], [sampling_rate]
  generator.pt    {"generator": state_dict} with weight-norm keys `<conv>.weight_g / .weight_v` (fairseq), or a
                  Lightning checkpoint of UnitVocoderLitModule ({"state_dict": {"generator.<key>": ...}})
loaded with torch.load(weights_only=True). Weight norm is torch's parametrization here; fairseq's keys are
mapped on load.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

log = logging.getLogger(__name__)
LRELU_SLOPE = 0.1


def _legacy_weight_norm(module: nn.Module) -> nn.Module:
    return torch.nn.utils.weight_norm(module)  # fairseq's key layout (weight_g/weight_v), for writing references


@dataclass
class UnitHiFiGANConfig:
    num_embeddings: int = 500
    embedding_dim: int = 128
    model_in_dim: int | None = None  # embedding_dim (+ embedding_dim with speakers) when None
    upsample_rates: list[int] = field(default_factory=lambda: [5, 4, 4, 4, 2])  # 640 = 25 Hz at 16 kHz
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [11, 8, 8, 8, 4])
    upsample_initial_channel: int = 256
    resblock: str = "1"
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]])
    multispkr: bool = False
    num_speakers: int = 200
    dur_predictor_params: dict[str, Any] | None = field(default_factory=lambda: {
        "encoder_embed_dim": 128, "var_pred_hidden_dim": 128, "var_pred_kernel_size": 3, "var_pred_dropout": 0.5})
    sampling_rate: int = 16_000

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "UnitHiFiGANConfig":
        known = set(cls.__dataclass_fields__)
        cfg = cls(**{k: v for k, v in values.items() if k in known})
        if values.get("embedder_params") or values.get("f0"):
            raise ValueError("unit HiFi-GAN configs with an external speaker embedder or F0 input are not supported "
                             "(set multispkr with num_speakers instead)")
        return cfg

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.upsample_rates:
            hop *= r
        return hop

    @property
    def input_dim(self) -> int:
        return self.model_in_dim or self.embedding_dim * (2 if self.multispkr else 1)


class ResBlock1(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations, wn) -> None:
        super().__init__()
        pad = lambda d: (kernel * d - d) // 2  # noqa: E731
        self.convs1 = nn.ModuleList(wn(nn.Conv1d(channels, channels, kernel, 1, dilation=d, padding=pad(d)))
                                    for d in dilations)
        self.convs2 = nn.ModuleList(wn(nn.Conv1d(channels, channels, kernel, 1, dilation=1, padding=pad(1)))
                                    for _ in dilations)

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class ResBlock2(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations, wn) -> None:
        super().__init__()
        self.convs = nn.ModuleList(wn(nn.Conv1d(channels, channels, kernel, 1, dilation=d,
                                                padding=(kernel * d - d) // 2)) for d in dilations[:2])

    def forward(self, x):
        for c in self.convs:
            x = x + c(F.leaky_relu(x, LRELU_SLOPE))
        return x


class VariancePredictor(nn.Module):
    """fairseq's duration predictor: two conv + LayerNorm blocks, a linear to one value (log(1 + duration))."""

    def __init__(self, p: Mapping[str, Any]) -> None:
        super().__init__()
        k, h = int(p["var_pred_kernel_size"]), int(p["var_pred_hidden_dim"])
        self.conv1 = nn.Sequential(nn.Conv1d(int(p["encoder_embed_dim"]), h, k, padding=(k - 1) // 2), nn.ReLU())
        self.ln1 = nn.LayerNorm(h)
        self.dropout_module = nn.Dropout(float(p.get("var_pred_dropout", 0.5)))
        self.conv2 = nn.Sequential(nn.Conv1d(h, h, k, padding=1), nn.ReLU())
        self.ln2 = nn.LayerNorm(h)
        self.proj = nn.Linear(h, 1)

    def forward(self, x):  # [B, T, C] -> [B, T]
        x = self.dropout_module(self.ln1(self.conv1(x.transpose(1, 2)).transpose(1, 2)))
        x = self.dropout_module(self.ln2(self.conv2(x.transpose(1, 2)).transpose(1, 2)))
        return self.proj(x).squeeze(2)


class CodeGenerator(nn.Module):
    def __init__(self, cfg: UnitHiFiGANConfig, legacy_weight_norm: bool = False) -> None:
        super().__init__()
        wn = _legacy_weight_norm if legacy_weight_norm else weight_norm
        self.cfg = cfg
        self.num_kernels, self.num_upsamples = len(cfg.resblock_kernel_sizes), len(cfg.upsample_rates)
        ch0 = cfg.upsample_initial_channel
        self.conv_pre = wn(nn.Conv1d(cfg.input_dim, ch0, 7, 1, padding=3))
        block = ResBlock1 if str(cfg.resblock) == "1" else ResBlock2
        self.ups = nn.ModuleList(
            wn(nn.ConvTranspose1d(ch0 // 2**i, ch0 // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        self.resblocks = nn.ModuleList()
        for i in range(self.num_upsamples):
            ch = ch0 // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(block(ch, k, d, wn))
        self.conv_post = wn(nn.Conv1d(ch, 1, 7, 1, padding=3))
        self.dict = nn.Embedding(cfg.num_embeddings, cfg.embedding_dim)
        if cfg.multispkr:
            self.spkr = nn.Embedding(cfg.num_speakers, cfg.embedding_dim)
        self.dur_predictor = VariancePredictor(cfg.dur_predictor_params) if cfg.dur_predictor_params else None

    def durations(self, code: torch.Tensor) -> torch.Tensor:
        """Frames per (deduplicated) unit [B, T] >= 1, as fairseq: round(exp(pred) - 1)."""
        log_dur = self.dur_predictor(self.dict(code))
        return torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)

    def forward(self, code: torch.Tensor, spkr: torch.Tensor | None = None,
                dur_prediction: bool = False) -> torch.Tensor:
        """code [B, T] unit ids (spkr [B] speaker ids) -> waveform [B, 1, T * hop_length] in [-1, 1]."""
        x = self.dict(code).transpose(1, 2)
        if dur_prediction:
            if self.dur_predictor is None:
                raise ValueError("this vocoder has no duration predictor: give it non-deduplicated units")
            if x.size(0) != 1:
                raise ValueError("duration prediction expands one utterance at a time")
            x = torch.repeat_interleave(x, self.durations(code).view(-1), dim=2)
        if self.cfg.multispkr:
            if spkr is None:
                raise ValueError("a multi-speaker unit HiFi-GAN needs speaker ids (spkr)")
            x = torch.cat([x, self.spkr(spkr.view(-1))[:, :, None].expand(-1, -1, x.shape[-1])], dim=1)
        x = self.conv_pre(x)
        for i in range(self.num_upsamples):
            x = self.ups[i](F.leaky_relu(x, LRELU_SLOPE))
            xs = sum(self.resblocks[i * self.num_kernels + j](x) for j in range(self.num_kernels))
            x = xs / self.num_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


_LEGACY_KEY = re.compile(r"^(.*)\.weight_([gv])$")


def from_fairseq_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`<m>.weight_g/_v` (torch.nn.utils.weight_norm, fairseq) -> `<m>.parametrizations.weight.original0/1`."""
    out = {}
    for key, value in state.items():
        m = _LEGACY_KEY.match(key)
        out[f"{m.group(1)}.parametrizations.weight.original{0 if m.group(2) == 'g' else 1}" if m else key] = value
    return out


class UnitHiFiGANVocoder:
    """Callable like the other vocoders: units -> waveform [T] (speaker 0 unless given)."""

    def __init__(self, generator: CodeGenerator, speaker: int = 0) -> None:
        self.generator = generator.eval()
        self.speaker = speaker

    @property
    def n_units(self) -> int:
        return self.generator.cfg.num_embeddings

    @property
    def config(self) -> UnitHiFiGANConfig:
        return self.generator.cfg

    @torch.no_grad()
    def __call__(self, units, deduplicated: bool = True, speaker: int | None = None) -> torch.Tensor:
        code = torch.as_tensor(units, dtype=torch.long).view(1, -1)
        if code.numel() == 0:
            return torch.zeros(0)
        if int(code.min()) < 0 or int(code.max()) >= self.n_units:
            from most_lightning.audio.mean_mel_vocoder import UnitVocabularyMismatchError

            raise UnitVocabularyMismatchError(f"unit ids span [{int(code.min())}, {int(code.max())}] but the "
                                              f"vocoder knows {self.n_units} units")
        predict = deduplicated and self.generator.dur_predictor is not None
        if deduplicated and not predict:
            log.warning("unit HiFi-GAN without a duration predictor got deduplicated units: one frame per unit")
        spkr = torch.tensor([self.speaker if speaker is None else speaker]) if self.generator.cfg.multispkr else None
        return self.generator(code, spkr=spkr, dur_prediction=predict)[0, 0]


def load_unit_hifigan(path: str | Path, config: str | Path | None = None) -> UnitHiFiGANVocoder:
    p = Path(path)
    if p.is_dir():
        candidates = [p / "generator.pt", *sorted(p.glob("*.ckpt")), *sorted(p.glob("*.pt"))]
        weights = next((c for c in candidates if c.is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{p}: no generator.pt / *.ckpt / *.pt checkpoint")
        config_path = Path(config) if config else p / "config.json"
    else:
        weights, config_path = p, Path(config) if config else p.parent / "config.json"
    if not weights.is_file():
        raise FileNotFoundError(f"unit HiFi-GAN checkpoint {weights}: no such file")
    ckpt = torch.load(str(weights), map_location="cpu", weights_only=True)
    if "state_dict" in ckpt and "hyper_parameters" in ckpt:  # our Lightning checkpoint carries its config
        cfg = UnitHiFiGANConfig.from_dict(ckpt["hyper_parameters"]["generator"])
        state = {k.removeprefix("generator."): v for k, v in ckpt["state_dict"].items() if k.startswith("generator.")}
    else:
        if not config_path.is_file():
            raise FileNotFoundError(f"unit HiFi-GAN {weights}: no config.json beside it (fairseq/SpiritLM "
                                    "vocoders ship one; pass config=<path>)")
        cfg = UnitHiFiGANConfig.from_dict(json.loads(config_path.read_text()))
        state = ckpt.get("generator", ckpt)
    generator = CodeGenerator(cfg)
    missing, unexpected = generator.load_state_dict(from_fairseq_keys(state), strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match its config: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}")
    return UnitHiFiGANVocoder(generator)
