"""Unit extractor = feature encoder + quantizer (+ dedup of consecutive repeats).

The quantizer is k-means (the default) or a phone classifier fitted on alignments (audio/phone_classifier.py).

    extractor = UnitExtractor.fit(train_waveforms, n_units=500)   # MFCC encoder by default
    units = extractor(wave)                                         # LongTensor [frames] at 25 Hz
    extractor.save(dir); UnitExtractor.load(dir)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .features import FeatureEncoder, MFCCEncoder, build_encoder
from .phone_classifier import PhoneClassifierQuantizer
from .quantizer import KMeansQuantizer

CONFIG_FILE = "unit_extractor.json"
CENTROIDS_FILE = "kmeans.safetensors"
QUANTIZER_FILES = {"kmeans": CENTROIDS_FILE, "phone_classifier": "phone_classifier.safetensors"}


def dedup_units(units: Sequence | torch.Tensor) -> list:
    """Merge runs of the same unit: [5, 5, 7, 7, 7, 5] -> [5, 7, 5] (as SpiritLM/MoST feed units to the LM; also
    phone names)."""
    seq = units.tolist() if isinstance(units, torch.Tensor) else list(units)
    return [u for i, u in enumerate(seq) if i == 0 or u != seq[i - 1]]


def sample_frames(features: Sequence[torch.Tensor], max_frames: int, seed: int = 0) -> torch.Tensor:
    """Concatenate per-utterance features, keeping a seeded random subset of at most max_frames rows."""
    x = torch.cat(list(features), dim=0)
    if x.shape[0] > max_frames:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(x.shape[0], generator=g)[:max_frames]]
    return x


class UnitExtractor:
    def __init__(self, encoder: FeatureEncoder, quantizer: KMeansQuantizer | PhoneClassifierQuantizer,
                 dedup: bool = False):
        if encoder.dim != quantizer.dim:
            layer = f" layer {encoder.layer}" if hasattr(encoder, "layer") else ""
            raise ValueError(f"the {getattr(encoder, 'kind', 'feature')} encoder{layer} gives {encoder.dim}-d features "
                             f"but the quantizer ({quantizer.source}) has {quantizer.dim}-d centroids")
        self.encoder = encoder
        self.quantizer = quantizer
        self.dedup = dedup

    @property
    def n_units(self) -> int:
        return self.quantizer.n_units

    @property
    def frame_rate(self) -> float:
        return self.encoder.frame_rate

    @property
    def sample_rate(self) -> int:
        return self.encoder.sample_rate

    @classmethod
    def fit(
        cls,
        waveforms: Iterable[torch.Tensor],
        n_units: int = 500,
        encoder: FeatureEncoder | None = None,
        max_frames: int = 200_000,
        seed: int = 0,
        dedup: bool = False,
    ) -> "UnitExtractor":
        """Fit the quantizer on the encoder's features of `waveforms` (16 kHz mono [T] tensors)."""
        encoder = encoder or MFCCEncoder()
        feats = [encoder(w) for w in waveforms]
        return cls(encoder, KMeansQuantizer.fit(sample_frames(feats, max_frames, seed), n_units, seed=seed), dedup)

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        """[T] waveform at encoder.sample_rate -> LongTensor unit ids (deduplicated if self.dedup)."""
        units = self.quantizer(self.encoder(wave))
        return torch.tensor(dedup_units(units), dtype=torch.long) if self.dedup else units

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        kind = self.quantizer.kind
        self.quantizer.save(d / QUANTIZER_FILES[kind])
        meta = {"encoder": self.encoder.config(), "n_units": self.n_units, "dedup": self.dedup,
                "frame_rate": self.frame_rate, "quantizer": QUANTIZER_FILES[kind], "quantizer_kind": kind}
        (d / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "UnitExtractor":
        d = Path(directory)
        if not (d / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{d}: no {CONFIG_FILE}; expected a directory written by UnitExtractor.save")
        meta = json.loads((d / CONFIG_FILE).read_text())
        kind = meta.get("quantizer_kind", "kmeans")
        if kind not in QUANTIZER_FILES:
            raise ValueError(f"{d / CONFIG_FILE}: unknown quantizer_kind {kind!r} (known: {sorted(QUANTIZER_FILES)})")
        quantizer_cls = PhoneClassifierQuantizer if kind == "phone_classifier" else KMeansQuantizer
        quantizer = quantizer_cls.load(d / meta.get("quantizer", QUANTIZER_FILES[kind]))
        return cls(build_encoder(meta["encoder"]), quantizer, bool(meta.get("dedup", False)))
