"""MoST model: config, attention, routers, MoE layers and the decoder."""

from most_lightning.model.config import ConfigError, MoSTConfig, RouterConfig
from most_lightning.model.decoder import MoSTForCausalLM, MoSTOutput
from most_lightning.model.partition import ExpertPartition, expert_partition
from most_lightning.model.router import ROUTERS, Router, RouterStats, Routing, register_router

__all__ = [
    "ConfigError", "ExpertPartition", "MoSTConfig", "MoSTForCausalLM", "MoSTOutput", "ROUTERS", "Router",
    "RouterConfig", "RouterStats", "Routing", "expert_partition", "register_router",
]
