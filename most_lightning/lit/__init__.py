"""Lightning side of MoST: the LitModule (it sums and logs the loss parts the model returns), metrics and callbacks.

Exports load lazily so that importing a light helper of this package does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ExpertLoadMonitor": "most_lightning.lit.callbacks",
    "MoSTLitModule": "most_lightning.lit.module",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'most_lightning.lit' has no attribute {name!r}")
