"""The speech front end's settings (the `audio` Hydra group, conf/audio/*.yaml) and what they build.

The data side reads them to lay out speech (units, or MoST-C frame slots: ``frame_counter``); the LitModule
builds the frozen encoder of MoST-C from them (``build_continuous_encoder``) and hands it to the model's audio
input, so the model never reads this config itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

AudioMode = Literal["units", "continuous"]
Markers = Literal["drop", "keep"]


@dataclass
class AudioFrontendConfig:
    """The `audio` Hydra group (conf/audio/*.yaml)."""

    mode: AudioMode = "units"
    encoder: dict[str, Any] | None = None  # FeatureEncoder config ('kind': 'hubert' | 'mfcc'); None = corpus units
    quantizer: str | None = None  # units mode with an encoder: centroid file; None = fit k-means on train audio
    markers: Markers = "drop"  # continuous: drop (reference) or keep the begin/end-of-audio tokens around frames
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in ("units", "continuous"):
            raise ValueError(f"audio.mode must be 'units' or 'continuous', got {self.mode!r}")
        if self.markers not in ("drop", "keep"):
            raise ValueError(f"audio.markers must be 'drop' or 'keep', got {self.markers!r}")
        if self.mode == "continuous" and not self.encoder:
            raise ValueError("audio.mode=continuous needs audio.encoder (e.g. {kind: hubert, checkpoint: <path>, "
                             "layer: last}); see conf/audio/continuous.yaml")
        if self.encoder is not None:
            self.encoder = {"kind": "hubert", **dict(self.encoder)}
            kind = self.encoder["kind"]
            if kind not in ("hubert", "mfcc"):
                raise ValueError(f"audio.encoder.kind must be 'hubert' or 'mfcc', got {kind!r}")
            if kind == "mfcc":  # `audio.encoder.kind=mfcc` on a HuBERT preset: its HuBERT-only keys do not apply
                from dataclasses import fields

                from .features import MFCCConfig

                mfcc_fields = {f.name for f in fields(MFCCConfig)}
                hubert_only = {"checkpoint", "format", "layer", "arch", "seed"}
                unknown = sorted(set(self.encoder) - mfcc_fields - hubert_only - {"kind"})
                if unknown:
                    raise ValueError(f"audio.encoder has keys {unknown} that the MFCC encoder does not know; "
                                     f"its settings are {sorted(mfcc_fields)}")
                self.encoder = {k: v for k, v in self.encoder.items() if k not in hubert_only}

    @classmethod
    def from_any(cls, value: "AudioFrontendConfig | Mapping | None") -> "AudioFrontendConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(value, DictConfig):
                value = OmegaConf.to_container(value, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        values = dict(value)
        known = {"mode", "encoder", "quantizer", "markers"}
        return cls(**{k: values[k] for k in known if k in values},
                   extra={k: v for k, v in values.items() if k not in known})

    @property
    def continuous(self) -> bool:
        return self.mode == "continuous"


def frame_counter(encoder: Mapping[str, Any]) -> Callable[[int], int]:
    """n_samples -> frames of the configured encoder, without building its weights where avoidable."""
    encoder = dict(encoder)
    kind = encoder.get("kind", "hubert")
    if kind == "mfcc":
        from .features import MFCCConfig, MFCCEncoder

        return MFCCEncoder(MFCCConfig(**{k: v for k, v in encoder.items() if k != "kind"})).n_frames
    from .hubert import arch_from_any

    if encoder.get("checkpoint"):
        from .hubert_checkpoints import read_hubert_checkpoint

        return read_hubert_checkpoint(encoder["checkpoint"], encoder.get("format", "auto")).arch.n_frames
    return arch_from_any(encoder.get("arch", "tiny")).n_frames


def build_continuous_encoder(audio: "AudioFrontendConfig | Mapping | None") -> Any:
    """The frozen feature encoder of MoST-C for an `audio` config with mode=continuous, else None."""
    from .features import build_encoder

    cfg = AudioFrontendConfig.from_any(audio)
    if not cfg.continuous:
        return None
    return build_encoder({"kind": "hubert", **cfg.encoder})
