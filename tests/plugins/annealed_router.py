"""A router written outside the package, to prove that a new router needs no package file changed.

    python run.py router._target_=tests.plugins.annealed_router.AnnealedRouter router.start_temperature=3

Vanilla top-k over a softmax whose temperature anneals towards 1 after every optimizer step (state kept in
checkpoints), with a learned per-modality logit offset (a router-owned parameter a pretrained checkpoint
lacks) and a non-persistent buffer rebuilt by ``init_buffers``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from most_lightning.model.config import ConfigError, RouterConfig
from most_lightning.model.router import Router


@dataclass
class AnnealedConfig(RouterConfig):
    start_temperature: float = 2.0
    decay: float = 0.9  # temperature <- 1 + (temperature - 1) * decay after each optimizer step

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start_temperature <= 0:
            raise ConfigError(f"router.start_temperature={self.start_temperature} must be > 0")


class AnnealedRouter(Router):
    Config = AnnealedConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.modality_offset = nn.Parameter(torch.zeros(2, self.n_experts))
        self.register_buffer("temperature", torch.tensor(self.cfg.start_temperature, dtype=torch.float32))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("log_temperature", torch.empty((), dtype=torch.float32), persistent=False)

    def init_buffers(self) -> None:
        super().init_buffers()
        self.log_temperature = self.temperature.detach().float().log()

    def reset_state(self) -> None:
        self.modality_offset.zero_()
        self.temperature.fill_(self.cfg.start_temperature)
        self.steps.zero_()
        self.init_buffers()

    def after_optimizer_step(self, reduce=None) -> None:
        with torch.no_grad():
            self.temperature.copy_(1 + (self.temperature - 1) * self.cfg.decay)
            self.steps += 1
            self.init_buffers()

    def select(self, logits, modality):
        logits = logits + self.modality_offset[modality.long()]
        scores = (logits * torch.exp(-self.log_temperature)).softmax(dim=-1)
        _, indices = torch.topk(scores, self.top_k, dim=-1)
        return scores.gather(1, indices), indices, scores


class StaleBufferRouter(AnnealedRouter):
    """A plug-in bug: a non-persistent buffer that init_buffers does not rebuild."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("scale", torch.ones(()), persistent=False)


class NotARouter:
    pass
