"""Unit quality against phone alignments: phone-normalised mutual information (PNMI), phone purity and, for units
that name phones (the phone classifier), the phone error rate.

The demo corpus stores flite's phone alignment of every utterance ("pau:0.171 dh:0.216 ...", end times in s),
so a unit extractor can be scored without training anything (HuBERT reports PNMI the same way). Higher is
better: PNMI = I(phone; unit) / H(phone).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Iterable, Sequence

import torchaudio

from .units import dedup_units


def frame_phones(alignment: str, n_frames: int, frame_rate: float) -> list[str]:
    """Phone label at the centre of each of n_frames frames, from 'phone:end_time' pairs."""
    pairs = [item.rsplit(":", 1) for item in alignment.split()]
    if not pairs:
        raise ValueError("empty phone alignment")
    labels, k = [], 0
    for j in range(n_frames):
        t = (j + 0.5) / frame_rate
        while k < len(pairs) - 1 and float(pairs[k][1]) < t:
            k += 1
        labels.append(pairs[k][0])
    return labels


def pnmi(phones: Iterable[Hashable], units: Iterable[int]) -> tuple[float, float]:
    """(PNMI, phone purity) of paired frame labels."""
    joint = Counter(zip(phones, units))
    n = sum(joint.values())
    if n == 0:
        raise ValueError("no frames")
    p_phone, p_unit = Counter(), Counter()
    for (p, u), c in joint.items():
        p_phone[p] += c
        p_unit[u] += c
    mi = sum(c / n * math.log(c * n / (p_phone[p] * p_unit[u])) for (p, u), c in joint.items())
    h_phone = -sum(c / n * math.log(c / n) for c in p_phone.values())
    best: dict[int, int] = {}
    for (p, u), c in joint.items():
        best[u] = max(best.get(u, 0), c)
    return (mi / h_phone if h_phone > 0 else 0.0), sum(best.values()) / n


def utterance_pnmi(alignments: Sequence[str], unit_seqs: Sequence[Sequence[int]], frame_rate: float = 25.0):
    """PNMI and purity over utterances given their alignments and (NOT deduplicated) frame units."""
    phones, units = [], []
    for alignment, seq in zip(alignments, unit_seqs):
        phones += frame_phones(alignment, len(seq), frame_rate)
        units += list(seq)
    return pnmi(phones, units)


def phone_error_rate(alignments: Sequence[str], phone_seqs: Sequence[Sequence[str]]) -> float:
    """Edit distance of the deduplicated phone sequences to the alignments' phone strings, over the reference
    phones (repeats merged on both sides: dedup cannot tell two equal phones in a row apart)."""
    errors = n_ref = 0
    for alignment, seq in zip(alignments, phone_seqs):
        ref = dedup_units([item.rsplit(":", 1)[0] for item in alignment.split()])
        errors += torchaudio.functional.edit_distance(ref, dedup_units(seq))
        n_ref += len(ref)
    if n_ref == 0:
        raise ValueError("no reference phones")
    return errors / n_ref

