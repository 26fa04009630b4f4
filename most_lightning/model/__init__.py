"""MoST model: config, attention, routers, MoE layers and the decoder.

Exports load lazily so that light modules (``model.config``, read when Hydra composes a run's config) do not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "most_lightning.model.config",
    "MoSTConfig": "most_lightning.model.config",
    "RouterConfig": "most_lightning.model.config",
    "MoSTForCausalLM": "most_lightning.model.decoder",
    "MoSTOutput": "most_lightning.model.decoder",
    "ExpertPartition": "most_lightning.model.partition",
    "expert_partition": "most_lightning.model.partition",
    "ROUTERS": "most_lightning.model.router",
    "Router": "most_lightning.model.router",
    "RouterStats": "most_lightning.model.router",
    "Routing": "most_lightning.model.router",
    "register_router": "most_lightning.model.router",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'most_lightning.model' has no attribute {name!r}")
