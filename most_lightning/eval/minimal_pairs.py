"""Speech-LM minimal pairs: does the model give the real item a higher log-likelihood than its corrupted twin?

Audio goes through the model's own front end (the corpus' unit extractor, dedup as in training) and is scored
as BOS + [begin-of-audio] + units + [end-of-audio]: the log-likelihood of every token after BOS, summed
(`acc_sum`) and divided by the number of scored tokens (`acc_mean`, length-normalised). Ties count one half
(the ZeroSpeech convention). Layouts read (`sets: {name: {layout: ..., path: ...}}`):

  zerospeech   ZeroSpeech 2021 lexical (sWUGGY) / syntactic (sBLIMP) dirs: <path>/gold.csv + <path>/<filename>.wav;
               gold.csv columns id, filename, correct (1 real / 0 corrupted) [+ voice, ...]. Items with the same
               id (and voice, if given) form a group; every correct item is compared with every incorrect one.
  paired_wavs  spoken StoryCloze style: <path>/<stem><correct_suffix>.wav next to <stem><incorrect_suffix>.wav
               (defaults "_correct" / "_incorrect"; set the suffixes to the release you have).

Pairs whose audio is missing or unreadable are excluded and counted (`n_pairs_skipped`).
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from most_lightning.audio.io import AudioDecodeError, read_audio
from most_lightning.data.collate import collate_teacher_forced
from most_lightning.data.tasks import IGNORE_INDEX, Example
from most_lightning.metrics.scores import pair_accuracy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MinimalPair:
    key: str
    correct: Path
    incorrect: Path


def read_zerospeech(path: str | Path) -> list[MinimalPair]:
    d = Path(path)
    gold = d / "gold.csv"
    if not gold.is_file():
        raise FileNotFoundError(f"{d}: no gold.csv (ZeroSpeech 2021 layout: <dir>/gold.csv + <dir>/<filename>.wav)")
    with gold.open(newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"id", "filename", "correct"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{gold}: needs columns {sorted(need)}, has {sorted(rows[0]) if rows else 'no rows'}")
    groups: dict[tuple[str, str], dict[str, list[Path]]] = {}
    for row in rows:
        group = groups.setdefault((row["id"], row.get("voice", "")), {"1": [], "0": []})
        name = row["filename"] if row["filename"].endswith(".wav") else row["filename"] + ".wav"
        if str(row["correct"]).strip() not in ("0", "1"):
            raise ValueError(f"{gold}: row {row['filename']}: correct must be 0 or 1, got {row['correct']!r}")
        group[str(row["correct"]).strip()].append(d / name)
    pairs = []
    for (item, voice), g in groups.items():
        for good in g["1"]:
            for bad in g["0"]:
                pairs.append(MinimalPair(f"{item}/{voice}/{bad.stem}" if voice else f"{item}/{bad.stem}", good, bad))
    return pairs


def read_paired_wavs(path: str | Path, correct_suffix: str = "_correct",
                     incorrect_suffix: str = "_incorrect") -> list[MinimalPair]:
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such directory of paired wav files")
    pairs = []
    for good in sorted(d.glob(f"*{correct_suffix}.wav")):
        stem = good.name[: -len(f"{correct_suffix}.wav")]
        pairs.append(MinimalPair(stem, good, d / f"{stem}{incorrect_suffix}.wav"))
    if not pairs:
        raise ValueError(f"{d}: no *{correct_suffix}.wav files (set correct_suffix/incorrect_suffix)")
    return pairs


def read_pairs(layout: str, path: str, **options: Any) -> list[MinimalPair]:
    if layout == "zerospeech":
        return read_zerospeech(path)
    if layout == "paired_wavs":
        return read_paired_wavs(path, **options)
    raise ValueError(f"minimal_pairs layout={layout!r}: known layouts are 'zerospeech', 'paired_wavs'")


@torch.no_grad()
def unit_log_likelihoods(ctx, unit_seqs: list[list[int]]) -> list[tuple[float, int]]:
    """(summed log-likelihood, number of scored tokens) of BOS + boa + units + eoa for each unit sequence."""
    tok = ctx.tokenizer
    examples = []
    for units in unit_seqs:
        ids = [tok.bos_id] + tok.encode_units(units)
        examples.append(Example(ids, [IGNORE_INDEX] + ids[1:], "speech_lm", ""))
    out: list[tuple[float, int]] = []
    for chunk in ctx.batches(examples, "speech LM"):
        batch = collate_teacher_forced(chunk, tok.pad_id, tok.modality_of)
        losses = ctx.model(batch["input_ids"].to(ctx.device), batch["modality"].to(ctx.device),
                           attention_mask=batch["attention_mask"].to(ctx.device),
                           labels=batch["labels"].to(ctx.device), compute_logits=False).token_losses
        nll, counts = losses.sum_and_count_by_row()
        out += [(-float(s), int(n)) for s, n in zip(nll.tolist(), counts.tolist())]
    return out


def _units(ctx, path: Path, cache: dict[Path, list[int] | None]) -> list[int] | None:
    if path not in cache:
        try:
            wave, _ = read_audio(str(path), target_sample_rate=ctx.unit_extractor().sample_rate)
            cache[path] = ctx.audio_to_units(wave)
        except (AudioDecodeError, FileNotFoundError) as err:
            log.warning(f"minimal pair audio {path}: {err}")
            cache[path] = None
    return cache[path]


def evaluate_minimal_pairs(ctx, *, sets: Mapping[str, Mapping[str, Any]], limit: int | None) -> dict:
    if not sets:
        raise ValueError("minimal_pairs.sets is empty: name at least one {layout, path}")
    metrics: dict[str, Any] = {}
    for name, spec in sets.items():
        spec = dict(spec)
        demo = spec.pop("demo", None)  # build a flite demo set of this kind into the run directory
        n_items = spec.pop("n_items", None)
        if demo:
            if n_items is None:
                raise ValueError(f"minimal_pairs.sets.{name}: a demo set needs n_items=<pairs to build>")
            from most_lightning.eval.demo_pairs import build_demo_pairs, corpus_texts

            sentences, train = corpus_texts(ctx.datamodule)
            spec["path"] = str(build_demo_pairs(demo, ctx.output_dir / "demo_pairs" / name, sentences, train,
                                                int(n_items)))
        if not spec.get("path"):
            raise ValueError(f"minimal_pairs.sets.{name}: give path=<dir> (or demo=lexical|syntactic|shuffled)")
        pairs = read_pairs(spec.pop("layout"), spec.pop("path"), **spec)
        pairs = pairs[:limit] if limit is not None else pairs
        cache: dict[Path, list[int] | None] = {}
        usable = []
        for p in pairs:
            good, bad = _units(ctx, p.correct, cache), _units(ctx, p.incorrect, cache)
            if good and bad:
                usable.append((good, bad))
        metrics[f"{name}_n_pairs"] = len(usable)
        metrics[f"{name}_n_pairs_skipped"] = len(pairs) - len(usable)
        if not usable:
            metrics[f"{name}_acc_sum"] = metrics[f"{name}_acc_mean"] = math.nan
            continue
        lls = unit_log_likelihoods(ctx, [u for pair in usable for u in pair])
        accuracy = pair_accuracy(list(zip(lls[0::2], lls[1::2])))
        metrics |= {f"{name}_{k}": v for k, v in accuracy.items()}
    return {"metrics": metrics, "settings": {"sets": {k: dict(v) for k, v in sets.items()}, "limit": limit}}
