"""Frozen HuBERT feature encoder on torchaudio's HuBERT architecture (`torchaudio.models.wav2vec2_model`).

    enc = HubertEncoder.from_checkpoint("mhubert_base_25hz.pt", layer=11)   # fairseq, HF dir or torchaudio
    feats = enc(wave)                      # [frames, 768] at enc.frame_rate (25 Hz or 50 Hz, from the checkpoint)
    enc = HubertEncoder.random("tiny", layer="last", seed=0)                  # offline demo: random, frozen

The architecture (conv stack -> frame rate, widths, depth, norm placement) is read from the checkpoint itself
(`hubert_checkpoints.read_hubert_checkpoint`), so mHuBERT-25Hz (hop 640) and HuBERT-base (hop 320) are both
served by the same class. Layer numbering follows fairseq's `output_layer` and HF's `hidden_states[i]`:
layer i (1-based) is the raw output of the i-th transformer layer (fairseq output_layer=i, transformers 5
hidden_states[i]); "last" is what a full forward pass returns: the last layer, plus the final LayerNorm in
pre-norm (layer_norm_first, HuBERT-large) models. For HuBERT-base both readings of the last layer agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..state_dicts import state_dict_mismatches

ConvStack = tuple[tuple[int, int, int], ...]  # (channels, kernel, stride) per conv layer, as fairseq writes it

CONV_50HZ: ConvStack = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2  # hop 320: HuBERT base/large
# A 25 Hz stack (hop 640): one more stride-2 layer. A real mHuBERT-25Hz checkpoint declares its own stack in
# cfg.model.conv_feature_layers, which is what the loader uses; this preset only shapes random models.
CONV_25HZ: ConvStack = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 3


@dataclass(frozen=True)
class HubertArch:
    """The numbers that fix a HuBERT's shapes and computation (dropouts are irrelevant for a frozen encoder)."""

    conv_layers: ConvStack = CONV_50HZ
    extractor_mode: str = "group_norm"  # "group_norm" (fairseq 'default', base) | "layer_norm" (large)
    conv_bias: bool = False
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ff_dim: int = 3072
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    layer_norm_first: bool = False  # pre-norm transformer (HuBERT large / HF do_stable_layer_norm)
    normalize_waveform: bool = False  # fairseq task.normalize: zero-mean unit-variance waveform per utterance
    sample_rate: int = 16_000

    def __post_init__(self):
        object.__setattr__(self, "conv_layers", tuple(tuple(int(x) for x in layer) for layer in self.conv_layers))
        if self.extractor_mode not in ("group_norm", "layer_norm"):
            raise ValueError(f"extractor_mode must be 'group_norm' or 'layer_norm', got {self.extractor_mode!r}")
        if not self.conv_layers or any(len(layer) != 3 for layer in self.conv_layers):
            raise ValueError(f"conv_layers must be (channels, kernel, stride) triples, got {self.conv_layers}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def hop_length(self) -> int:
        return math.prod(stride for _, _, stride in self.conv_layers)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def n_frames(self, n_samples: int) -> int:
        """Frames the conv stack makes from n_samples (valid convolutions, no padding)."""
        n = int(n_samples)
        for _, kernel, stride in self.conv_layers:
            n = (n - kernel) // stride + 1 if n >= kernel else 0
        return max(n, 0)

    def build(self) -> nn.Module:
        from torchaudio.models import wav2vec2_model

        return wav2vec2_model(
            extractor_mode=self.extractor_mode, extractor_conv_layer_config=[list(c) for c in self.conv_layers],
            extractor_conv_bias=self.conv_bias, encoder_embed_dim=self.embed_dim, encoder_projection_dropout=0.0,
            encoder_pos_conv_kernel=self.pos_conv_kernel, encoder_pos_conv_groups=self.pos_conv_groups,
            encoder_num_layers=self.num_layers, encoder_num_heads=self.num_heads, encoder_attention_dropout=0.0,
            encoder_ff_interm_features=self.ff_dim, encoder_ff_interm_dropout=0.0, encoder_dropout=0.0,
            encoder_layer_norm_first=self.layer_norm_first, encoder_layer_drop=0.0, aux_num_out=None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["conv_layers"] = [list(c) for c in self.conv_layers]
        return d


ARCH_PRESETS: dict[str, HubertArch] = {
    "base": HubertArch(),  # HuBERT-base, 50 Hz
    "base_25hz": HubertArch(conv_layers=CONV_25HZ),  # mHuBERT-base-25Hz shape
    # offline demo/test size: 25 Hz (hop 640) like the demo corpus units; 12 narrow layers so that the
    # reference's layer 11 (units) and last layer (MoST-C) exist, at a small fraction of base's cost
    "tiny": HubertArch(conv_layers=((32, 10, 5), (32, 8, 4), (32, 4, 4), (32, 2, 2), (32, 2, 2), (32, 2, 2)),
                       embed_dim=64, num_layers=12, num_heads=4, ff_dim=128, pos_conv_kernel=16, pos_conv_groups=4),
}


def arch_from_any(arch: "HubertArch | str | dict") -> HubertArch:
    if isinstance(arch, HubertArch):
        return arch
    if isinstance(arch, str):
        if arch not in ARCH_PRESETS:
            raise ValueError(f"unknown HuBERT architecture preset {arch!r}; known: {sorted(ARCH_PRESETS)}")
        return ARCH_PRESETS[arch]
    return HubertArch(**dict(arch))


class HubertEncoder(nn.Module):
    """Frozen HuBERT: waveform [T] -> features [frames, embed_dim] of one transformer layer.

    Follows the FeatureEncoder protocol of features.py (sample_rate, frame_rate, dim, __call__, config) and is an
    nn.Module so a LightningModule can move it to the accelerator. It stays in eval mode and never requires grad.
    """

    kind = "hubert"

    def __init__(self, arch: HubertArch, layer: int | str = "last", source: dict[str, Any] | None = None):
        super().__init__()
        self.arch = arch
        self.final_norm = layer in ("last", -1)  # full-forward output (see the module docstring)
        self.layer = self._check_layer(layer, arch)
        self.model = arch.build()
        self.source = dict(source or {})  # how to rebuild: {"checkpoint": ..., "format": ...} or {"seed": ...}
        self.freeze()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _check_layer(layer: int | str, arch: HubertArch) -> int:
        if layer in ("last", -1):
            return arch.num_layers
        if isinstance(layer, str) and layer.isdigit():
            layer = int(layer)
        if not isinstance(layer, int) or not 1 <= layer <= arch.num_layers:
            raise ValueError(f"HuBERT layer must be in 1..{arch.num_layers} or 'last' (this model has "
                             f"{arch.num_layers} transformer layers), got {layer!r}")
        return layer

    @classmethod
    def from_checkpoint(cls, path: str, layer: int | str = "last", format: str = "auto",
                        map_location: str | torch.device = "cpu") -> "HubertEncoder":
        """Load a fairseq checkpoint (.pt), a transformers HubertModel directory or a torchaudio state dict."""
        from .hubert_checkpoints import read_hubert_checkpoint

        ckpt = read_hubert_checkpoint(path, format, map_location)
        enc = cls(ckpt.arch, layer, source={"checkpoint": str(path), "format": ckpt.format})
        enc.load_converted(ckpt.state_dict, str(path))
        return enc

    @classmethod
    def random(cls, arch: HubertArch | str | dict = "tiny", layer: int | str = "last", seed: int = 0) -> "HubertEncoder":
        """A randomly initialised (seeded, hence reproducible) frozen HuBERT: the offline stand-in."""
        arch = arch_from_any(arch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = cls(arch, layer, source={"checkpoint": None, "seed": seed})
        return enc

    def load_converted(self, state_dict: dict[str, torch.Tensor], origin: str = "<state dict>") -> None:
        """Load a state dict in torchaudio's key layout; missing/unexpected keys and shapes are named."""
        from .hubert_checkpoints import HubertCheckpointError

        own = self.model.state_dict()
        parts = state_dict_mismatches(own, state_dict)
        if parts:
            raise HubertCheckpointError(origin, "; ".join(parts) + " (is this a HuBERT checkpoint of another "
                                        "layout, or does its config disagree with its weights?)")
        self.model.load_state_dict(state_dict, strict=True)
        self.freeze()

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "HubertEncoder":
        return super().train(False)  # frozen: Lightning's module.train() must not switch dropout/layerdrop on

    # ------------------------------------------------------------------ FeatureEncoder protocol
    @property
    def sample_rate(self) -> int:
        return self.arch.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.arch.frame_rate

    @property
    def dim(self) -> int:
        return self.arch.embed_dim

    def n_frames(self, n_samples: int) -> int:
        return self.arch.n_frames(n_samples)

    def config(self) -> dict[str, Any]:
        layer = "last" if self.final_norm else self.layer
        return {"kind": self.kind, "layer": layer, "arch": self.arch.to_dict(), **self.source}

    @torch.no_grad()
    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() != 1:
            raise ValueError(f"expected a mono waveform [T], got shape {tuple(wave.shape)}")
        return self.encode_batch([wave])[0]

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self(wave)

    # ------------------------------------------------------------------ batches
    def _prepare(self, wave: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        wave = wave.to(device=device, dtype=torch.float32)
        if self.arch.normalize_waveform:
            wave = F.layer_norm(wave, wave.shape)
        return wave

    def _layer_output(self, waves: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        outputs, _ = self.model.extract_features(waves, lengths, num_layers=self.layer)
        x = outputs[-1]
        if self.arch.layer_norm_first and self.final_norm:
            x = self.model.encoder.transformer.layer_norm(x)  # what fairseq/HF return from a full forward
        return x

    @torch.no_grad()
    def encode_batch(self, waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Features of each waveform, identical to encoding it alone ([frames_i, dim] float32 each).

        Group-norm models (HuBERT base) normalise each channel over time, so padding would change every frame:
        they run one utterance at a time. Layer-norm models run as one padded batch with `lengths`
        (torchaudio masks the padding itself; no hand-made, possibly inverted, padding mask).
        """
        waves = [self._prepare(w) for w in waves]
        for i, w in enumerate(waves):
            if w.dim() != 1:
                raise ValueError(f"waveform {i}: expected [T], got shape {tuple(w.shape)}")
            if self.n_frames(w.numel()) < 1:
                raise ValueError(f"waveform {i} has {w.numel()} samples: too short for one HuBERT frame "
                                 f"(needs at least {self._min_samples()})")
        if not waves:
            return []
        if self.arch.extractor_mode == "group_norm" or len(waves) == 1:
            return [self._layer_output(w[None], None)[0].float() for w in waves]
        lengths = torch.tensor([w.numel() for w in waves], device=waves[0].device)
        padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
        feats = self._layer_output(padded, lengths)
        return [feats[i, : self.n_frames(int(n))].float() for i, n in enumerate(lengths.tolist())]

    def _min_samples(self) -> int:
        n = 1
        for _, kernel, stride in reversed(self.arch.conv_layers):
            n = (n - 1) * stride + kernel
        return n


def build_hubert_encoder(config: dict[str, Any]) -> HubertEncoder:
    """Rebuild from `HubertEncoder.config()` (or a Hydra `audio.encoder` node): checkpoint or seeded random."""
    config = dict(config)
    config.pop("kind", None)
    layer = config.get("layer", "last")
    if config.get("checkpoint"):
        return HubertEncoder.from_checkpoint(config["checkpoint"], layer, config.get("format", "auto"))
    return HubertEncoder.random(config.get("arch", "tiny"), layer, int(config.get("seed", 0)))
