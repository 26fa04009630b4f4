"""Comparing a model's state dict with one loaded for it, so that a mismatch is reported by name."""

from __future__ import annotations

from typing import Mapping

import torch


def state_dict_mismatches(model: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor],
                          shown: int = 5) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of `loaded` against `model`, one readable item per kind
    (the first `shown` names of each); empty when every tensor fits."""
    missing = sorted(set(model) - set(loaded))
    unexpected = sorted(set(loaded) - set(model))
    shapes = [f"{k}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(model[k].shape)}"
              for k in sorted(set(model) & set(loaded)) if tuple(model[k].shape) != tuple(loaded[k].shape)]

    def names(items: list[str]) -> str:
        return f"{items[:shown]}{f' ... ({len(items)} in all)' if len(items) > shown else ''}"

    problems = []
    if missing:
        problems.append(f"missing keys {names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {names(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches {names(shapes)}")
    return problems
