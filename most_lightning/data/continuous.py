"""MoST-C data side: ASR prompts whose audio span is continuous encoder frames instead of unit tokens.

    prompt = BOS + instruction + "\\n\\n" + [boa] + F frame slots + [eoa] + EOS + "\\n\\nOutput: "   (markers: keep)
    prompt = BOS + instruction + "\\n\\n" +         F frame slots         + EOS + "\\n\\nOutput: "   (markers: drop)

F = the encoder's frame count for the waveform, known here from the conv stack alone, so every slot, label and
mask is laid out BEFORE the model runs: the model only swaps the slots' embeddings for projected features
(`most_lightning.model.audio_input`). Slots carry the pad id as a placeholder, modality mark 1 (audio) and
label -100; the response labels sit exactly where their tokens are (no re-alignment after a splice: the
reference expanded one placeholder into F frames without shifting the labels).
The batch gains `audio_mask` [B, T] (True on slots), `audio_waves` [B, S] (zero-padded) and
`audio_wave_lengths` [B] (0 for rows without audio).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch

from .samples import OverlongSampleError
from .tasks import IGNORE_INDEX, Example, GenerationExample, TaskFormatter

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

                from ..audio.features import MFCCConfig

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
        from ..audio.features import MFCCConfig, MFCCEncoder

        return MFCCEncoder(MFCCConfig(**{k: v for k, v in encoder.items() if k != "kind"})).n_frames
    from ..audio.hubert import arch_from_any

    if encoder.get("checkpoint"):
        from ..audio.hubert_checkpoints import read_hubert_checkpoint

        return read_hubert_checkpoint(encoder["checkpoint"], encoder.get("format", "auto")).arch.n_frames
    return arch_from_any(encoder.get("arch", "tiny")).n_frames


class ContinuousASRFormatter:
    """Lays out continuous-audio ASR examples (teacher-forced and generation prompts) for one tokenizer."""

    def __init__(self, formatter: TaskFormatter, n_frames: Callable[[int], int], markers: Markers = "drop"):
        self.fmt, self.n_frames, self.markers = formatter, n_frames, markers
        tok = formatter.tok
        self.placeholder = tok.pad_id  # never embedded: the model swaps the slot for a projected frame
        self.open = [tok.boa_id] if markers == "keep" else []
        self.close = [tok.eoa_id] if markers == "keep" else []

    def _prompt(self, wave: torch.Tensor, key: str) -> tuple[list[int], int, int]:
        frames = self.n_frames(int(wave.numel()))
        if frames < 1:
            raise OverlongSampleError(key, "?", f"audio of {wave.numel()} samples is too short for one encoder frame")
        head = self.fmt._asr_head + self.open
        prompt = head + [self.placeholder] * frames + self.close + self.fmt._tail
        return prompt, len(head), frames

    def asr(self, wave: torch.Tensor, text: str, key: str = "") -> Example:
        prompt, start, frames = self._prompt(wave, key)
        response = [self.fmt.tok.bos_id] + self.fmt.tok.encode_text(text) + [self.fmt.tok.eos_id]
        ex = Example(prompt + response, [IGNORE_INDEX] * len(prompt) + response, "asr", key)
        if self.fmt.max_length is not None and len(ex) > self.fmt.max_length:
            # truncating would cut frames or the answer: always drop (counted by the bad-sample policy)
            raise OverlongSampleError(key, "?", f"continuous ASR example has {len(ex)} positions "
                                      f"({frames} audio frames) > max_length {self.fmt.max_length}")
        ex.audio, ex.audio_start, ex.audio_frames = wave, start, frames
        return ex

    def asr_generation(self, wave: torch.Tensor, reference_text: str, key: str = "") -> GenerationExample:
        prompt, start, frames = self._prompt(wave, key)
        if self.fmt.max_length is not None and len(prompt) > self.fmt.max_length:
            raise OverlongSampleError(key, "?", f"continuous ASR prompt has {len(prompt)} positions > max_length "
                                      f"{self.fmt.max_length}")
        ex = GenerationExample(prompt, reference_text, key)
        ex.audio, ex.audio_start, ex.audio_frames = wave, start, frames
        return ex


def audio_batch(examples: Sequence[Any], width: int, left_padded: bool) -> dict[str, torch.Tensor] | None:
    """audio_mask [B, width], audio_waves [B, S], audio_wave_lengths [B]; None when no example has audio."""
    if not any(getattr(e, "audio", None) is not None for e in examples):
        return None
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    lengths = torch.zeros(len(examples), dtype=torch.long)
    longest = max(int(e.audio.numel()) for e in examples if getattr(e, "audio", None) is not None)
    waves = torch.zeros((len(examples), longest), dtype=torch.float32)
    for row, e in enumerate(examples):
        if getattr(e, "audio", None) is None:
            continue
        n = len(e.prompt_ids) if isinstance(e, GenerationExample) else len(e)
        offset = width - n if left_padded else 0
        start = offset + e.audio_start
        mask[row, start : start + e.audio_frames] = True
        lengths[row] = e.audio.numel()
        waves[row, : e.audio.numel()] = e.audio.float()
    return {"audio_mask": mask, "audio_waves": waves, "audio_wave_lengths": lengths}
