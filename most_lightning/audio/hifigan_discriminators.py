"""HiFi-GAN's discriminators and losses (Kong et al. 2020; the layout of fairseq's speech_synthesis hifigan and
jik876/hifi-gan): a multi-period discriminator (MPD: 2-D convs over the waveform folded by each period) and a
multi-scale discriminator (MSD: 1-D grouped convs on the raw, x2 and x4 average-pooled waveform, spectral norm
on the first scale, weight norm elsewhere), least-squares GAN losses and the feature-matching loss.

`channel_divisor` divides every channel width of the paper (MPD 32..1024, MSD 128..1024) so a CPU smoke run
stays small; 1 is the paper's size. Groups shrink to a common divisor of the narrowed widths.
"""

from __future__ import annotations

from math import gcd
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

LRELU_SLOPE = 0.1
MPD_CHANNELS = (32, 128, 512, 1024, 1024)
# (out channels, kernel, stride, groups) of DiscriminatorS' convs after its first Conv1d(1, 128, 15)
MSD_LAYERS = ((128, 41, 2, 4), (256, 41, 2, 16), (512, 41, 4, 16), (1024, 41, 4, 16), (1024, 41, 1, 16),
              (1024, 5, 1, 1))

FeatureMaps = list[list[torch.Tensor]]


def _width(channels: int, divisor: int) -> int:
    return max(1, channels // divisor)


class PeriodDiscriminator(nn.Module):
    """Folds [B, 1, T] into [B, 1, T/p, p] (reflect-padding T to a multiple of p) and applies 2-D (k, 1) convs."""

    def __init__(self, period: int, channel_divisor: int = 1, kernel_size: int = 5, stride: int = 3,
                 use_spectral_norm: bool = False) -> None:
        super().__init__()
        norm = spectral_norm if use_spectral_norm else weight_norm
        self.period = period
        widths = [1, *(_width(c, channel_divisor) for c in MPD_CHANNELS)]
        pad = ((kernel_size - 1) // 2, 0)
        self.convs = nn.ModuleList(
            norm(nn.Conv2d(cin, cout, (kernel_size, 1), (stride if i < len(widths) - 2 else 1, 1), padding=pad))
            for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])))
        self.conv_post = norm(nn.Conv2d(widths[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, c, t = x.shape
        if t % self.period:
            x = F.pad(x, (0, self.period - t % self.period), "reflect")
        x = x.view(b, c, -1, self.period)
        return _conv_stack(self.convs, self.conv_post, x)


def _conv_stack(convs: nn.ModuleList, conv_post: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Leaky-ReLU conv stack + output conv: (flattened scores, every layer's feature map for feature matching)."""
    fmap = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        fmap.append(x)
    x = conv_post(x)
    fmap.append(x)
    return torch.flatten(x, 1, -1), fmap


class ScaleDiscriminator(nn.Module):
    def __init__(self, channel_divisor: int = 1, use_spectral_norm: bool = False) -> None:
        super().__init__()
        norm = spectral_norm if use_spectral_norm else weight_norm
        cin = _width(128, channel_divisor)
        convs = [norm(nn.Conv1d(1, cin, 15, 1, padding=7))]
        for channels, kernel, stride, groups in MSD_LAYERS:
            cout = _width(channels, channel_divisor)
            convs.append(norm(nn.Conv1d(cin, cout, kernel, stride, groups=gcd(groups, cin, cout),
                                        padding=(kernel - 1) // 2)))
            cin = cout
        self.convs = nn.ModuleList(convs)
        self.conv_post = norm(nn.Conv1d(cin, 1, 3, 1, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return _conv_stack(self.convs, self.conv_post, x)


class _Ensemble(nn.Module):
    discriminators: nn.ModuleList

    def forward(self, real: torch.Tensor, fake: torch.Tensor):
        """real, fake [B, 1, T] -> (real scores, fake scores, real feature maps, fake feature maps), one entry
        per sub-discriminator."""
        scores_r, scores_f, fmaps_r, fmaps_f = [], [], [], []
        for disc in self.discriminators:
            (sr, fr), (sf, ff) = disc(real), disc(fake)
            scores_r.append(sr), scores_f.append(sf), fmaps_r.append(fr), fmaps_f.append(ff)
        return scores_r, scores_f, fmaps_r, fmaps_f


class MultiPeriodDiscriminator(_Ensemble):
    def __init__(self, periods: Sequence[int] = (2, 3, 5, 7, 11), channel_divisor: int = 1) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(int(p), channel_divisor) for p in periods)


class MultiScaleDiscriminator(_Ensemble):
    """Scale i sees the waveform average-pooled i times (AvgPool1d(4, 2, padding=2)); scale 0 uses spectral norm."""

    def __init__(self, scales: int = 3, channel_divisor: int = 1) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(ScaleDiscriminator(channel_divisor, use_spectral_norm=i == 0)
                                            for i in range(scales))
        self.pool = nn.AvgPool1d(4, 2, padding=2)

    def forward(self, real: torch.Tensor, fake: torch.Tensor):
        scores_r, scores_f, fmaps_r, fmaps_f = [], [], [], []
        for i, disc in enumerate(self.discriminators):
            if i:
                real, fake = self.pool(real), self.pool(fake)
            (sr, fr), (sf, ff) = disc(real), disc(fake)
            scores_r.append(sr), scores_f.append(sf), fmaps_r.append(fr), fmaps_f.append(ff)
        return scores_r, scores_f, fmaps_r, fmaps_f


def discriminator_loss(real_scores: list[torch.Tensor], fake_scores: list[torch.Tensor]) -> torch.Tensor:
    """LSGAN: sum over sub-discriminators of mean((1 - D(real))^2) + mean(D(fake)^2)."""
    return sum(torch.mean((1 - r) ** 2) + torch.mean(f**2) for r, f in zip(real_scores, fake_scores))


def generator_adversarial_loss(fake_scores: list[torch.Tensor]) -> torch.Tensor:
    """LSGAN: sum over sub-discriminators of mean((1 - D(G(s)))^2)."""
    return sum(torch.mean((1 - f) ** 2) for f in fake_scores)


def feature_matching_loss(real_fmaps: FeatureMaps, fake_fmaps: FeatureMaps) -> torch.Tensor:
    """2 x sum over every layer of every sub-discriminator of mean|D_l(real) - D_l(fake)| (real detached), as
    HiFi-GAN's feature_loss (weight 2 built in)."""
    return 2 * sum(torch.mean(torch.abs(r.detach() - f))
                   for rs, fs in zip(real_fmaps, fake_fmaps) for r, f in zip(rs, fs))
