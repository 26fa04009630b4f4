"""Hydra's `model` + `router` groups -> a validated MoSTConfig.

The model group names a preset and holds its fields (composed from the Python preset, most_lightning/config_nodes.py);
a field set to `null` keeps the preset's value. The vocabulary size is not a model choice: it comes from the
datamodule's tokenizer at run time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from most_lightning.model.config import ConfigError, MoSTConfig, RouterConfig, without_retired_fields
from most_lightning.model.partition import expert_partition

# Model-group keys that are not MoSTConfig fields.
_NON_FIELDS = ("preset", "init")  # init: where the weights come from (model/checkpoint/init.py)


def _plain(cfg: Mapping | DictConfig | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def build_router_config(router: Mapping | DictConfig) -> RouterConfig:
    """The router group (``_target_`` or ``name`` plus fields) -> the router class's own config."""
    from most_lightning.model.router import router_config

    return router_config(router)


def build_model_config(
    model: Mapping | DictConfig, router: Mapping | DictConfig, vocab_size: int | None
) -> MoSTConfig:
    """MoSTConfig from the model group (preset + overrides), the router group and the tokenizer's vocab size."""
    values = without_retired_fields({k: v for k, v in _plain(model).items() if v is not None}, "model config")
    preset = values.pop("preset", None)
    values.pop("init", None)
    known = {f.name for f in dataclasses.fields(MoSTConfig)}
    unknown = sorted(set(values) - known - set(_NON_FIELDS))
    if unknown:
        raise ConfigError(f"model config has unknown keys {unknown}; MoSTConfig fields are {sorted(known)}")
    values["router"] = build_router_config(router)
    if vocab_size is not None:
        values["vocab_size"] = int(vocab_size)
    if preset is not None:
        return MoSTConfig.from_preset(preset, **values)
    return MoSTConfig(**values)


def moe_layer_ids(config: MoSTConfig) -> list[int]:
    return [i for i in range(config.num_layers) if config.is_moe_layer(i)]


def audio_expert_ids(config: MoSTConfig) -> tuple[int, ...] | None:
    """The audio group's routed experts under the configured partition (also meaningful for vanilla routing,
    as the reference split that routing ignores); None if the split is impossible for this config."""
    try:
        return expert_partition(
            config.n_routed_experts, config.audio_expert_fraction, config.top_k, config.partition
        ).audio
    except ConfigError:
        return None
