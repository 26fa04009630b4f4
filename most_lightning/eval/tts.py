"""TTS evaluation: text -> unit tokens (the model, KV cache) -> waveform (a vocoder) -> an external recogniser
-> WER/CER against the text. Also, on the same utterances: the recogniser on the ORIGINAL audio (the ceiling
of the judge) and on the vocoder's resynthesis of the ground-truth units (the ceiling of the vocoder).

Vocoders (settings `vocoders: {name: {kind: ..., ...}}`):
  mean_mel      MeanMelVocoder, no training: fitted on `fit_utterances` training utterances, or loaded from `path`
  unit_hifigan  a unit HiFi-GAN checkpoint (`checkpoint`: fairseq/SpiritLM layout or ours)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from most_lightning.audio.io import read_audio
from most_lightning.audio.mean_mel_vocoder import MeanMelVocoder, check_unit_vocabulary
from most_lightning.data.samples import AUDIO_MEMBER, BadSampleError, BadSamplePolicy, decode_speech_sample, iter_shard
from most_lightning.data.tasks import TaskFormatter
from most_lightning.eval.asr import TranscriptErrorRates, generate_batch
from most_lightning.eval.recognizers import build_recognizer

log = logging.getLogger(__name__)


@dataclass
class Utterance:
    key: str
    transcript: str
    wave: torch.Tensor  # 16 kHz
    units: list[int]  # 25 Hz, NOT deduplicated


def split_utterances(ctx, split: str, limit: int | None = None) -> tuple[list[Utterance], int]:
    """Utterances of a prepared split with their audio; bad ones (missing/undecodable audio, empty transcript,
    bad units) are skipped and counted, or raise, by the data config's on_bad_sample policy."""
    dm = ctx.datamodule
    policy = BadSamplePolicy(dm.on_bad_sample)
    out: list[Utterance] = []
    for shard in dm.shards(split):
        for sample in iter_shard(shard, policy):
            try:
                rec = decode_speech_sample(sample, ctx.tokenizer.n_units, dedup=False, verify_audio="full")
                wave, _ = read_audio(sample[AUDIO_MEMBER], name=rec.key)
            except BadSampleError as err:
                policy.handle(err)
                continue
            out.append(Utterance(rec.key, rec.transcript, wave, rec.units))
            if limit is not None and len(out) >= limit:
                return out, policy.total
    return out, policy.total


def build_vocoder(ctx, name: str, spec: Mapping[str, Any]):
    """A vocoder object with `n_units` and `__call__(units, deduplicated=True) -> wave`."""
    spec = dict(spec)
    kind = spec.pop("kind", name)
    if kind == "mean_mel":
        if spec.get("path"):
            vocoder = MeanMelVocoder.load(spec["path"])
        else:
            pairs, _ = split_utterances(ctx, "train", int(spec.get("fit_utterances", 300)))
            vocoder = MeanMelVocoder.fit(((u.wave, u.units) for u in pairs), ctx.tokenizer.n_units)
            vocoder.save(ctx.output_dir / "vocoders" / name)
    elif kind == "unit_hifigan":
        from most_lightning.audio.hifigan import load_unit_hifigan

        if not spec.get("checkpoint"):
            raise ValueError(f"tts.vocoders.{name}: unit_hifigan needs checkpoint=<path>")
        vocoder = load_unit_hifigan(spec["checkpoint"])
    else:
        raise ValueError(f"tts.vocoders.{name}.kind={kind!r}: known kinds are 'mean_mel', 'unit_hifigan'")
    check_unit_vocabulary(vocoder.n_units, ctx.tokenizer.n_units, f"vocoder {name!r}")
    return vocoder


def get_recognizer(ctx, spec: Mapping[str, Any] | str):
    key = f"recognizer:{spec!r}"
    if key not in ctx.cache:
        ctx.cache[key] = build_recognizer(spec)
    return ctx.cache[key]


def synthesize_units(ctx, texts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The model's (deduplicated) unit sequence for each text, greedy with the KV cache."""
    fmt = TaskFormatter(ctx.tokenizer)
    units: list[list[int]] = []
    for chunk in ctx.batches(texts, "tts units"):
        new = generate_batch(ctx, [fmt.tts_prompt_ids(t) for t in chunk], max_new_tokens)
        for row in new.tolist():
            if ctx.tokenizer.eos_id in row:
                row = row[: row.index(ctx.tokenizer.eos_id)]
            if ctx.tokenizer.eoa_id in row:
                row = row[: row.index(ctx.tokenizer.eoa_id)]
            units.append(ctx.tokenizer.decode_units(row))
    return units


def _score(ctx, hyps: list[str], refs: list[str]) -> tuple[float, float]:
    scorer = TranscriptErrorRates(ctx.normalizer)
    scorer.update(hyps, refs)
    s = scorer.compute()
    return float(s["wer"]), float(s["cer"])


def evaluate_tts(ctx, split: str = "test", limit: int | None = None, max_new_tokens: int = 300,
                 vocoders: Mapping[str, Mapping[str, Any]] | None = None,
                 recognizer: Mapping[str, Any] | str = "pocketsphinx", ground_truth: bool = True,
                 resynthesis: bool = True, save_audio: int = 2, n_examples: int = 3) -> dict:
    from most_lightning.audio.io import encode_audio
    from most_lightning.audio.units import dedup_units

    vocoders = dict(vocoders or {"mean_mel": {"kind": "mean_mel"}})
    utts, n_skipped = split_utterances(ctx, split, limit)
    if not utts:
        raise ValueError(f"tts: no usable utterance in split {split!r} ({n_skipped} skipped)")
    refs = [u.transcript for u in utts]
    rec = get_recognizer(ctx, recognizer)
    metrics: dict[str, Any] = {"n_utterances": len(utts), "n_skipped_samples": n_skipped}
    examples: dict[str, list[dict[str, str]]] = {}
    if ground_truth:
        hyps = rec.transcribe([u.wave for u in utts])
        metrics["wer_ground_truth"], metrics["cer_ground_truth"] = _score(ctx, hyps, refs)
        examples["ground_truth"] = [{"reference": r, "hypothesis": h} for r, h in zip(refs, hyps)][:n_examples]
    units = synthesize_units(ctx, refs, max_new_tokens)
    metrics["n_empty_unit_outputs"] = sum(not u for u in units)  # scored as errors (empty transcript)
    metrics["mean_units_generated"] = sum(map(len, units)) / len(units)
    metrics["mean_units_reference"] = sum(len(dedup_units(u.units)) for u in utts) / len(utts)
    audio_dir = ctx.output_dir / "tts_audio"
    for name, spec in vocoders.items():
        vocoder = build_vocoder(ctx, name, spec)
        waves = [vocoder(u, deduplicated=True) if u else torch.zeros(0) for u in units]
        hyps = rec.transcribe(waves)
        metrics[f"wer_{name}"], metrics[f"cer_{name}"] = _score(ctx, hyps, refs)
        examples[name] = [{"reference": r, "hypothesis": h} for r, h in zip(refs, hyps)][:n_examples]
        if resynthesis:
            resynth = [vocoder(dedup_units(u.units), deduplicated=True) for u in utts]
            hyps_r = rec.transcribe(resynth)
            metrics[f"wer_resynth_{name}"], metrics[f"cer_resynth_{name}"] = _score(ctx, hyps_r, refs)
            examples[f"resynth_{name}"] = [{"reference": r, "hypothesis": h}
                                           for r, h in zip(refs, hyps_r)][:n_examples]
        for i, (u, w) in enumerate(zip(utts[:save_audio], waves)):
            audio_dir.mkdir(parents=True, exist_ok=True)
            if w.numel():
                (audio_dir / f"{u.key}.{name}.flac").write_bytes(encode_audio(w, vocoder_rate(vocoder)))
            if resynthesis:
                (audio_dir / f"{u.key}.{name}.resynth.flac").write_bytes(
                    encode_audio(resynth[i], vocoder_rate(vocoder)))
    return {"metrics": metrics, "examples": examples,
            "settings": {"split": split, "limit": limit, "recognizer": recognizer, "vocoders": list(vocoders)}}


def vocoder_rate(vocoder) -> int:
    return int(getattr(getattr(vocoder, "config", None), "sample_rate", 16_000))
