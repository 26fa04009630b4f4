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

    Attention regroups the tokens of every example into right-padded batches of examples ([n, longest, ...];
    one batch per power-of-two length class, so a 40-token example is not padded to a 300-token one), runs causal
    SDPA on each and puts the results back: attending costs what the examples cost one by one, not what the
    whole rows would (a block-diagonal mask over a row still computes every masked block).
    gather [slots]: flat token (row * T + t) of each slot of the batches, one after the other (slots past an
    example's end repeat its first token; causal attention never lets a real token see them); scatter [B * T]:
    slot of each token, or the extra last slot (zeros) for the padding after a row's last example;
    shapes: (examples, longest) per batch.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    shapes: list[tuple[int, int]]

    @classmethod
    def from_segments(cls, segment_ids: torch.Tensor) -> "PackedRows":
        """segment_ids [B, T]: examples numbered from 1 in each row, 0 = padding."""
        positions = segment_positions(segment_ids).reshape(-1)
        real = (segment_ids > 0).reshape(-1)
        starts = real & segment_starts(segment_ids).reshape(-1)
        example = starts.cumsum(0) - 1
        tokens = torch.arange(real.numel(), device=real.device)
        lengths = torch.bincount(example[real], minlength=int(starts.sum())).tolist()
        classes: dict[int, list[int]] = {}
        for e, n in enumerate(lengths):
            classes.setdefault((n - 1).bit_length(), []).append(e)
        base, order, widths, shapes, at = [0] * len(lengths), [], [], [], 0
        for members in classes.values():
            longest = max(lengths[e] for e in members)
            for j, e in enumerate(members):
                base[e] = at + j * longest
            order += members
            widths += [longest] * len(members)
            shapes.append((len(members), longest))
            at += len(members) * longest
        slot = torch.tensor(base, device=real.device)[example.clamp(min=0)] + positions
        owner = torch.tensor(order, device=real.device).repeat_interleave(torch.tensor(widths, device=real.device))
        gather = tokens[starts][owner]
        gather[slot[real]] = tokens[real]
        return cls(gather, torch.where(real, slot, at), shapes)

    def group(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, h, T, d] -> one [examples, h, longest, d] batch per length class."""
        batch, heads, seq, dim = x.shape
        flat = x.transpose(1, 2).reshape(batch * seq, heads, dim).index_select(0, self.gather)
        pieces = flat.split([n * longest for n, longest in self.shapes])
        return [p.view(n, longest, heads, dim).transpose(1, 2) for p, (n, longest) in zip(pieces, self.shapes)]

    def ungroup(self, ys: list[torch.Tensor], batch: int, seq: int) -> torch.Tensor:
        """The batches of ``group`` -> [B, h, T, d] (zeros on the padding after the last example of a row)."""
        heads, dim = ys[0].shape[1], ys[0].shape[3]
        flat = torch.cat([y.transpose(1, 2).reshape(-1, heads, dim) for y in ys] + [ys[0].new_zeros(1, heads, dim)])
        return flat.index_select(0, self.scatter).view(batch, seq, heads, dim).transpose(1, 2)
