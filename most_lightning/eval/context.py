"""What every eval task gets: the model, the tokenizer, the data, the normaliser and the batching settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from most_lightning.metrics.normalize import TextNormalizer


@dataclass
class EvalContext:
    model: Any  # MoSTForCausalLM
    tokenizer: Any  # MoSTTokenizer
    datamodule: Any = None  # MoSTDataModule (shards, unit extractor)
    normalizer: TextNormalizer = field(default_factory=TextNormalizer)
    batch_size: int = 8
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    output_dir: Path = Path(".")
    progress: bool = True
    cache: dict[str, Any] = field(default_factory=dict)  # shared between tasks (e.g. the recogniser)
    audio_input: Any = None  # MoST-C (audio=continuous): frozen encoder + trained projection; None = units model

    @property
    def continuous(self) -> bool:
        """The model reads speech as continuous encoder features (MoST-C), not unit tokens."""
        return self.audio_input is not None

    def prompt_embeds(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The prompts' embeddings with the audio frames spliced in for a continuous-audio generation batch (the
        same splice as MoSTLitModule's), else None (the model embeds the ids itself)."""
        if "audio_mask" not in batch:
            return None
        if self.audio_input is None:
            raise ValueError("these prompts carry continuous audio but the model has no audio input: evaluate with "
                             "the training run's audio=continuous")
        ids = batch["prompt_ids"].to(self.device)
        return self.audio_input.splice(self.model.embed(ids), batch["audio_mask"].to(self.device),
                                       batch["audio_waves"].to(self.device), batch["audio_wave_lengths"],
                                       batch.get("key"))

    def batches(self, items: Sequence[Any], desc: str) -> Iterator[Sequence[Any]]:
        """items in batches of batch_size, with a progress bar on a terminal."""
        starts = range(0, len(items), self.batch_size)
        if self.progress and len(starts) > 1:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, unit="batch", leave=False)
        for start in starts:
            yield items[start : start + self.batch_size]

    def unit_extractor(self):
        """The model's own speech front end (the corpus' UnitExtractor: encoder + k-means), loaded once."""
        if "unit_extractor" not in self.cache:
            from most_lightning.audio.units import UnitExtractor

            if self.datamodule is None:
                raise ValueError("this task turns audio into units and needs the data config's unit extractor")
            manifest = self.datamodule.manifest
            directory = self.datamodule.corpus_dir / manifest.get("unit_extractor", "unit_extractor")
            self.cache["unit_extractor"] = UnitExtractor.load(directory)
        return self.cache["unit_extractor"]

    def audio_to_units(self, wave: torch.Tensor) -> list[int]:
        """16 kHz mono waveform -> unit ids as the model was trained on them (deduplicated if the data are)."""
        from most_lightning.audio.units import dedup_units

        units = self.unit_extractor()(wave)
        units = units.tolist() if isinstance(units, torch.Tensor) else list(units)
        dedup = getattr(self.datamodule, "dedup_units", True)
        return dedup_units(units) if dedup else units
