"""Batchers: examples in, collated batches out. `add(example)` returns the batches that became ready.

    fixed   batch_size examples per batch, right-padded (the demo behaviour).
    bucket  length-bucketed with a token budget: pool `bucket_pool` examples, sort by length, cut batches whose
            padded size (rows x longest row) stays <= max_tokens; batches leave in a random order. Padding
            waste falls to a few percent; batch row counts vary.
    pack    packed rows of max_length tokens: examples are concatenated into rows (an example never straddles
            two rows), max_tokens // max_length rows per batch. `segment_ids` [B, T] numbers the examples in a
            row (0 = padding); the model attends within each example only and restarts positions at every
            example, so a packed row computes what its examples compute one by one.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Literal, get_args

import torch

from .collate import collate_teacher_forced
from .tasks import IGNORE_INDEX, Example

Batching = Literal["fixed", "bucket", "pack"]
BATCHINGS = get_args(Batching)


class FixedBatcher:
    def __init__(self, batch_size: int, pad_id: int, modality_of: Callable):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.pad_id, self.modality_of = batch_size, pad_id, modality_of
        self.pending: list[Example] = []

    def _collate(self, examples: list[Example]) -> dict[str, Any]:
        return collate_teacher_forced(examples, self.pad_id, self.modality_of)

    def add(self, example: Example) -> list[dict[str, Any]]:
        self.pending.append(example)
        if len(self.pending) < self.batch_size:
            return []
        batch, self.pending = self.pending, []
        return [self._collate(batch)]

    def flush(self) -> list[dict[str, Any]]:
        batch, self.pending = self.pending, []
        return [self._collate(batch)] if batch else []


class BucketBatcher(FixedBatcher):
    def __init__(self, max_tokens: int, pool: int, rng: random.Random, pad_id: int, modality_of: Callable,
                 max_rows: int | None = None):
        super().__init__(max_rows or 1, pad_id, modality_of)
        if pool < 1:
            raise ValueError(f"bucket_pool must be >= 1, got {pool}")
        self.max_tokens, self.pool, self.rng, self.max_rows = max_tokens, pool, rng, max_rows

    def _cut(self, examples: list[Example]) -> list[list[Example]]:
        groups, current = [], []
        for e in sorted(examples, key=len):
            rows = len(current) + 1
            if current and (rows * len(e) > self.max_tokens or (self.max_rows and rows > self.max_rows)):
                groups.append(current)
                current = []
            current.append(e)
        if current:
            groups.append(current)
        return groups

    def add(self, example: Example) -> list[dict[str, Any]]:
        if len(example) > self.max_tokens:
            from .samples import OverlongSampleError

            raise OverlongSampleError(example.key, "?", f"{len(example)} tokens > data.max_tokens {self.max_tokens}")
        self.pending.append(example)
        if len(self.pending) < self.pool:
            return []
        groups = self._cut(self.pending)
        self.pending = groups.pop()  # the longest, maybe partial, group waits for more company
        self.rng.shuffle(groups)
        return [self._collate(g) for g in groups]

    def flush(self) -> list[dict[str, Any]]:
        groups, self.pending = self._cut(self.pending), []
        return [self._collate(g) for g in groups]


class PackBatcher(FixedBatcher):
    def __init__(self, row_length: int, rows: int, pad_id: int, modality_of: Callable):
        super().__init__(rows, pad_id, modality_of)
        self.row_length = row_length
        self.rows: list[list[Example]] = []
        self.current: list[Example] = []

    def add(self, example: Example) -> list[dict[str, Any]]:
        if len(example) > self.row_length:
            from .samples import OverlongSampleError

            raise OverlongSampleError(example.key, "?", f"{len(example)} tokens > packed row length {self.row_length}")
        if sum(map(len, self.current)) + len(example) > self.row_length:
            self.rows.append(self.current)
            self.current = []
        self.current.append(example)
        if len(self.rows) < self.batch_size:
            return []
        rows, self.rows = self.rows, []
        return [self._collate_rows(rows)]

    def flush(self) -> list[dict[str, Any]]:
        rows = self.rows + ([self.current] if self.current else [])
        self.rows, self.current = [], []
        return [self._collate_rows(rows[i:i + self.batch_size]) for i in range(0, len(rows), self.batch_size)]

    def _collate_rows(self, rows: list[list[Example]]) -> dict[str, Any]:
        width = max(sum(map(len, r)) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        segments = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            at = 0
            for j, e in enumerate(row):
                ids[i, at:at + len(e)] = torch.tensor(e.input_ids)
                labels[i, at:at + len(e)] = torch.tensor(e.labels)
                segments[i, at:at + len(e)] = j + 1
                at += len(e)
        mask = segments > 0
        examples = [e for r in rows for e in r]
        return dict(input_ids=ids, labels=labels, modality=self.modality_of(ids) * mask, attention_mask=mask,
                    segment_ids=segments, task=["+".join(sorted({e.task for e in r})) for r in rows],
                    key=[e.key for e in examples], n_skipped=sum(e.n_skipped for e in examples),
                    n_truncated=sum(e.truncated for e in examples))


def make_batcher(kind: str, batch_size: int, max_tokens: int | None, bucket_pool: int, max_length: int | None,
                 rng: random.Random, pad_id: int, modality_of: Callable) -> FixedBatcher:
    if kind == "fixed":
        return FixedBatcher(batch_size, pad_id, modality_of)
    if kind not in BATCHINGS:
        raise ValueError(f"data.batching must be one of {BATCHINGS}, got {kind!r}")
    if not max_tokens or max_tokens < 1:
        raise ValueError(f"data.batching={kind} needs data.max_tokens (the token budget per batch), got {max_tokens}")
    if kind == "bucket":
        return BucketBatcher(max_tokens, bucket_pool, rng, pad_id, modality_of)
    if not max_length or max_length > max_tokens:
        raise ValueError(f"data.batching=pack needs data.max_length (the row length) <= data.max_tokens, got "
                         f"max_length={max_length}, max_tokens={max_tokens}")
    return PackBatcher(max_length, max_tokens // max_length, pad_id, modality_of)
