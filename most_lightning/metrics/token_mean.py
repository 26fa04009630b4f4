"""Token-weighted running means that sync across processes (torchmetrics states, summed)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class TokenMean(Metric):
    """sum(values) / count over an epoch; NaN when nothing was counted (e.g. no TTS sample in the split)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, total: torch.Tensor, count: torch.Tensor) -> None:  # type: ignore[override]
        self.total += total.detach().double()
        self.count += count.detach().double()

    def compute(self) -> torch.Tensor:
        if float(self.count) == 0.0:
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()
