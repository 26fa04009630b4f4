"""Hydra sweeper plugin `hydra/sweeper=most_optuna`: Optuna 5 ask-and-tell sweeps with a yaml search space,
pruning, crash-safe resume and several workers on one storage (see docs/ablations_and_sweeps.md).

Hydra finds it by scanning the `hydra_plugins` namespace package (this folder; keep hydra_plugins/ without an
__init__.py). This module stays light: Hydra imports every plugin module at start-up."""
