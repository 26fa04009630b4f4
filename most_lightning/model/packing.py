"""Packed rows (data.batching=pack): several examples share a row, numbered by ``segment_ids`` [B, T] from 1 in
each row (0 = the padding after the last one). The model keeps them apart: positions restart at every example,
attention stays within each example (``PackedRows``) and the balance loss takes every example as a sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: the first token of every run of equal segment ids (padding runs included)."""
    return segment_ids != F.pad(segment_ids, (1, 0), value=-1)[:, :-1]


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its segment (a packed example restarts at 0): [B, T] -> [B, T]."""
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    return index - torch.cummax(torch.where(segment_starts(segment_ids), index, 0), dim=1).values


def several_per_row(segment_ids: torch.Tensor) -> bool:
    """Whether some row holds more than one example (two adjacent real tokens of different segments)."""
    real = segment_ids > 0
    return bool(((segment_ids[:, 1:] != segment_ids[:, :-1]) & real[:, 1:] & real[:, :-1]).any())


@dataclass
class PackedRows:
    """Where the examples of packed rows lie (data.batching=pack), for attention within each example only.

    Attention regroups the tokens of every example into a right-padded [examples, longest, ...] batch, runs
    causal SDPA on it and puts the results back: the cost of attending is that of the examples one by one, not
    of the whole rows (a block-diagonal mask over the rows would compute every masked block too).
    gather [examples * longest]: flat token (row * T + t) of each slot (slots past an example's end repeat a
    token; causal attention never lets a real token see them); scatter [B * T]: slot of each token, the extra
    last slot (zeros) for the padding after a row's last example.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    n_examples: int
    longest: int

    @classmethod
    def from_segments(cls, segment_ids: torch.Tensor) -> "PackedRows":
        """segment_ids [B, T]: examples numbered from 1 in each row, 0 = padding."""
        positions = segment_positions(segment_ids)
        real = (segment_ids > 0).reshape(-1)
        starts = real & segment_starts(segment_ids).reshape(-1)
        example = starts.cumsum(0) - 1
        n_examples, longest = int(starts.sum()), int(positions.reshape(-1)[real].max()) + 1
        slot = example * longest + positions.reshape(-1)
        tokens = torch.arange(real.numel(), device=real.device)
        gather = tokens[starts].repeat_interleave(longest)  # slots past an example's end: its first token
        gather[slot[real]] = tokens[real]
        scatter = torch.where(real, slot, n_examples * longest)
        return cls(gather, scatter, n_examples, longest)

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h, T, d] -> [examples, h, longest, d]."""
        batch, heads, seq, dim = x.shape
        flat = x.transpose(1, 2).reshape(batch * seq, heads, dim)
        return flat.index_select(0, self.gather).view(self.n_examples, self.longest, heads, dim).transpose(1, 2)

    def ungroup(self, y: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        """[examples, h, longest, d] -> [B, h, T, d] (zeros on the padding after the last example of a row)."""
        _, heads, _, dim = y.shape
        flat = y.transpose(1, 2).reshape(self.n_examples * self.longest, heads, dim)
        flat = torch.cat((flat, flat.new_zeros(1, heads, dim)))
        return flat.index_select(0, self.scatter).view(batch, seq, heads, dim).transpose(1, 2)
