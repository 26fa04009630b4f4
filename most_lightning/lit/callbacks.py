"""Expert-load monitor: at the end of fit (and test) write a per-modality heatmap and CSV into the run dir."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from most_lightning.marks import MODALITY_NAMES
from most_lightning.metrics.expert_load import ExpertLoadAccumulator


class ExpertLoadMonitor(Callback):
    """Writes <prefix>_<stage>.csv (modality, layer, expert, group, load_fraction, tokens) and a PNG heatmap
    (layers x experts, one panel per modality) of the fraction of each modality's tokens sent to each expert.

    stage "train" aggregates the whole fit; "test" the teacher-forced test batches.
    """

    def __init__(self, output_dir: str | None = None, prefix: str = "expert_load", plot: bool = True) -> None:
        self.output_dir = output_dir
        self.prefix = prefix
        self.plot = plot

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, pl_module.expert_load["train"], "train")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        snapshot = getattr(pl_module, "expert_load_snapshot", {}).get("test")
        if snapshot is not None:
            self._write(trainer, pl_module, snapshot, "test")

    def _write(self, trainer: Trainer, pl_module: LightningModule, acc: ExpertLoadAccumulator, stage: str) -> None:
        if trainer.world_size > 1:
            acc = acc.reduced(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        if not trainer.is_global_zero or acc.empty:
            return
        out_dir = Path(self.output_dir or trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        frac = acc.load_fraction().float().cpu()
        layers = list(getattr(pl_module, "layer_ids", range(frac.shape[0])))
        audio = set(getattr(pl_module, "audio_experts", None) or ())
        csv_path = out_dir / f"{self.prefix}_{stage}.csv"
        write_expert_load_csv(csv_path, frac, acc.tokens.cpu(), layers, audio)
        written = [csv_path]
        if self.plot:
            png_path = out_dir / f"{self.prefix}_{stage}.png"
            plot_expert_load(png_path, frac, layers, audio, title=f"expert load ({stage})")
            written.append(png_path)
        rank_zero_info(f"expert load ({stage}) written to {', '.join(str(p) for p in written)}")


def write_expert_load_csv(
    path: Path, frac: torch.Tensor, tokens: torch.Tensor, layers: list[int], audio_experts: set[int]
) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["modality", "layer", "expert", "group", "load_fraction", "tokens"])
        for m, modality in enumerate(MODALITY_NAMES):
            for i, layer in enumerate(layers):
                for e in range(frac.shape[-1]):
                    group = "audio" if e in audio_experts else "text"
                    writer.writerow([modality, layer, e, group, f"{float(frac[i, m, e]):.6f}", int(tokens[i, m])])


def plot_expert_load(path: Path, frac: torch.Tensor, layers: list[int], audio_experts: set[int], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers, _, n_experts = frac.shape
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.3 * max(n_experts, 8) * 2, 1.5 + 0.35 * n_layers),
                             squeeze=False, constrained_layout=True)
    vmax = float(frac.max()) or 1.0
    for m, modality in enumerate(MODALITY_NAMES):
        ax = axes[0, m]
        image = ax.imshow(frac[:, m].numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(f"{modality} tokens")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(n_layers), [str(layer) for layer in layers])
        if audio_experts and len(audio_experts) < n_experts:
            boundary = min(audio_experts) - 0.5  # index split: audio group after the text group
            ax.axvline(boundary, color="white", linestyle="--", linewidth=1)
    fig.colorbar(image, ax=axes[0, :].tolist(), label="fraction of the modality's tokens")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
