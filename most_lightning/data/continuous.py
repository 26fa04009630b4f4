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

from typing import Any, Callable, Sequence

import torch

from ..audio.frontend import AudioFrontendConfig, Markers, frame_counter  # noqa: F401 (the datamodule's)
from .samples import OverlongSampleError
from .tasks import IGNORE_INDEX, Example, GenerationExample, TaskFormatter


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
