"""Pretrained weights in and out: DeepSeek-V2 import, Llama dense-to-MoE upcycling, HF-style export.

See docs/checkpoints.md. Command line: ``python -m most_lightning.model.checkpoint --help``.
"""

from most_lightning.model.checkpoint.api import (
    empty_model,
    import_weights,
    load_pretrained,
    pretrained_config,
    upcycle_pretrained,
    upcycle_weights,
)
from most_lightning.model.checkpoint.expert_layout import (
    EXPERT_LAYOUTS,
    load_routing_stats,
    measure_routing_stats,
    save_routing_stats,
)
from most_lightning.model.checkpoint.export import export_hf
from most_lightning.model.checkpoint.files import CheckpointDir, CheckpointError
from most_lightning.model.checkpoint.loader import LoadReport
from most_lightning.model.checkpoint.upcycle import identity_at_init

__all__ = [
    "EXPERT_LAYOUTS", "CheckpointDir", "CheckpointError", "LoadReport", "empty_model", "export_hf",
    "identity_at_init", "import_weights", "load_pretrained", "load_routing_stats", "measure_routing_stats",
    "pretrained_config", "save_routing_stats", "upcycle_pretrained", "upcycle_weights",
]
