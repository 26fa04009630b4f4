"""OpenMP settings that only take effect if they are in the environment before torch loads libgomp.

``GOMP_SPINCOUNT``: after every parallel region, libgomp's idle threads busy-wait for up to 300,000 spins
(several ms on these machines) before they sleep. The MoE layer's CPU worker threads (model/experts.py) start
right after such a region, and for those ms a spinning OpenMP thread and a worker share one core: on shape S
of experiments/bench_moe.py (2 threads) each worker lost ~6 ms per hand-off, ~12 ms of a 190 ms layer step
(spent waiting, not computing: wall time 44 ms vs CPU time 38 ms for the same rows). 30,000 spins (well under
a ms) remove that loss and still keep back-to-back small ops fast (with 0 spins a run of small OpenMP ops got
~40% slower); the `tiny` training step (no worker threads) did not move beyond run-to-run noise.

Importing ``most_lightning`` applies the default when torch is not loaded yet (run.py and the benchmarks import
it first) and the variable is unset: a value from the user's environment always wins.
"""

from __future__ import annotations

import os
import sys

OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "30000"}


def apply_openmp_defaults() -> dict[str, str]:
    """Put OPENMP_DEFAULTS into os.environ where unset, if torch is not imported yet; returns what it set."""
    if "torch" in sys.modules:  # libgomp has read its environment already: a change would not act here
        return {}
    applied = {name: value for name, value in OPENMP_DEFAULTS.items() if name not in os.environ}
    os.environ.update(applied)
    return applied


def openmp_note() -> str:
    """One line for benchmark headers: the OpenMP spin setting this process runs with."""
    return f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset (libgomp default 300000)')}"
