"""Validators for hydra.sweeper.validate: reject a point of the search space before a job starts."""

from __future__ import annotations

from omegaconf import DictConfig


def check_model_config(cfg: DictConfig) -> None:
    """The model + router groups must build a valid MoSTConfig (e.g. every expert group holds >= top_k experts);
    raises most_lightning.model.ConfigError naming the field otherwise."""
    from most_lightning.model.config_groups import build_model_config

    build_model_config(cfg.model, cfg.router, vocab_size=None)
