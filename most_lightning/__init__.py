"""most_lightning: train and study MoST (speech + text MoE LLM) with PyTorch Lightning and Hydra."""

from most_lightning.openmp_env import apply_openmp_defaults

apply_openmp_defaults()  # first: must run before torch loads its OpenMP runtime (see openmp_env.py)
