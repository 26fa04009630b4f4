"""Batches of the contract: teacher-forced (right padding) and ASR generation (left-padded prompts)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .tasks import IGNORE_INDEX, Example, GenerationExample

ModalityFn = Callable[[torch.Tensor], torch.Tensor]


def collate_teacher_forced(examples: Sequence[Example], pad_id: int, modality_of: ModalityFn) -> dict[str, Any]:
    """input_ids/labels/modality/attention_mask [B, T], right-padded with pad_id (labels -100, mask False)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[row, :n] = True
    batch = dict(input_ids=input_ids, labels=labels, modality=modality_of(input_ids) * mask, attention_mask=mask,
                 task=[e.task for e in examples], key=[e.key for e in examples],
                 n_skipped=sum(e.n_skipped for e in examples), n_truncated=sum(e.truncated for e in examples))
    return _with_audio(batch, examples, width, left_padded=False, modality_key="modality")


def collate_asr_generation(examples: Sequence[GenerationExample], pad_id: int,
                           modality_of: ModalityFn) -> dict[str, Any]:
    """prompt_ids/prompt_mask/prompt_modality [B, P], LEFT-padded so every prompt ends at the last column."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e.prompt_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e.prompt_ids)
        ids[row, width - n :] = torch.tensor(e.prompt_ids, dtype=torch.long)
        mask[row, width - n :] = True
    batch = dict(prompt_ids=ids, prompt_mask=mask, prompt_modality=modality_of(ids) * mask,
                 reference_text=[e.reference_text for e in examples], key=[e.key for e in examples],
                 n_skipped=sum(e.n_skipped for e in examples))
    return _with_audio(batch, examples, width, left_padded=True, modality_key="prompt_modality")


def _with_audio(batch: dict[str, Any], examples: Sequence, width: int, left_padded: bool,
                modality_key: str) -> dict[str, Any]:
    """Continuous-audio examples (MoST-C): add the frame-slot mask and waveforms; slots are marked audio."""
    from .continuous import audio_batch

    audio = audio_batch(examples, width, left_padded)
    if audio is not None:
        batch |= audio
        batch[modality_key] = batch[modality_key] | audio["audio_mask"].long()
    return batch


class TeacherForcedCollator:
    """Picklable collate_fn for DataLoader workers."""

    def __init__(self, pad_id: int, modality_of: ModalityFn):
        self.pad_id, self.modality_of = pad_id, modality_of

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        return collate_teacher_forced(examples, self.pad_id, self.modality_of)


class GenerationCollator(TeacherForcedCollator):
    """``mismatched``: the prompts carry other utterances' audio (the text-prior baseline); every batch says so
    (``batch["mismatched"]``), so whoever scores it needs no other setting."""

    def __init__(self, pad_id: int, modality_of: ModalityFn, mismatched: bool = False):
        super().__init__(pad_id, modality_of)
        self.mismatched = mismatched

    def __call__(self, examples: Sequence[GenerationExample]) -> dict[str, Any]:
        batch = collate_asr_generation(examples, self.pad_id, self.modality_of)
        return batch | {"mismatched": True} if self.mismatched else batch
