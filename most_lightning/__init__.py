"""most_lightning: train and study MoST (speech + text MoE LLM) with PyTorch Lightning and Hydra."""
