"""TTS evaluation: text -> unit tokens (the model, KV cache) -> waveform (a vocoder) -> an external recogniser
-> WER/CER against the text. Also, on the same utterances: the recogniser on the ORIGINAL audio (the ceiling
of the judge) and on the vocoder's resynthesis of the ground-truth units (the ceiling of the vocoder).

Vocoders (settings `vocoders: {name: {kind: ..., ...}}`):
  mean_mel      MeanMelVocoder, no training: fitted on `fit_utterances` training utterances, or loaded from `path`
  unit_mel      UnitMelVocoder (audio/unit_mel_vocoder.py): loaded from `path`, or trained once per corpus and
                settings (a few CPU minutes; cached under <corpus>/vocoders/) on `fit_utterances` train sentences
                spoken by flite's `voice`, unit-coded by the corpus's own unit extractor; resynthesis uses the true
                units WITH their run lengths
  unit_hifigan  a unit HiFi-GAN checkpoint (`checkpoint`: fairseq/SpiritLM layout or ours)

Stopping: a generated sequence "stops" when it emits end-of-audio; one that runs to `max_new_tokens` without it
"did not stop": it is counted (`n_did_not_stop`), never vocoded, and scored as an empty transcript (all
deletions). `stop_rate` is the fraction of utterances that end with end-of-audio within +-30% of the reference
length (deduplicated units). A prompt longer than the model's context is refused with the lengths.
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
from most_lightning.eval.asr import generate_batch
from most_lightning.eval.recognizers import build_recognizer
from most_lightning.metrics.transcripts import TranscriptErrorRates

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
    policy = BadSamplePolicy(dm.quality.on_bad_sample)
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
            from most_lightning.audio.mean_mel_vocoder import MeanMelConfig

            if "fit_utterances" not in spec:
                raise ValueError(f"vocoder {name!r}: a mean_mel vocoder needs fit_utterances=<train utterances> "
                                 "(or path=<a saved one>)")
            pairs, _ = split_utterances(ctx, "train", int(spec["fit_utterances"]))
            # the units' own frame rate (25 Hz k-means, 50 Hz phone classifier), 10 ms mel frames
            unit_hop = round(ctx.unit_extractor().sample_rate / ctx.unit_extractor().frame_rate)
            config = MeanMelConfig(n_units=ctx.tokenizer.n_units, unit_hop=unit_hop, sub_frames=max(unit_hop // 160, 1))
            vocoder = MeanMelVocoder.fit(((u.wave, u.units) for u in pairs), ctx.tokenizer.n_units, config)
            vocoder.save(ctx.output_dir / "vocoders" / name)
    elif kind == "unit_mel":
        from most_lightning.audio.unit_mel_vocoder import UnitMelVocoder

        if spec.get("path"):
            vocoder = UnitMelVocoder.load(spec["path"])
        else:
            from most_lightning.eval.unit_mel_training import cached_unit_mel_vocoder

            vocoder = cached_unit_mel_vocoder(ctx, spec)
    elif kind == "unit_hifigan":
        from most_lightning.audio.hifigan import load_unit_hifigan

        if not spec.get("checkpoint"):
            raise ValueError(f"tts.vocoders.{name}: unit_hifigan needs checkpoint=<path>")
        vocoder = load_unit_hifigan(spec["checkpoint"])
    else:
        raise ValueError(f"tts.vocoders.{name}.kind={kind!r}: known kinds are 'mean_mel', 'unit_mel', 'unit_hifigan'")
    check_unit_vocabulary(vocoder.n_units, ctx.tokenizer.n_units, f"vocoder {name!r}")
    return vocoder


def get_recognizer(ctx, spec: Mapping[str, Any] | str):
    key = f"recognizer:{spec!r}"
    if key not in ctx.cache:
        ctx.cache[key] = build_recognizer(spec)
    return ctx.cache[key]


STOP_TOLERANCE = 0.3  # a stop counts when the length is within +-30% of the reference's


class PromptTooLongError(ValueError):
    """A TTS prompt does not fit the model's context."""


def model_context(ctx) -> int | None:
    return getattr(getattr(ctx.model, "config", None), "max_position_embeddings", None)


def tts_prompts(ctx, texts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The TTS prompt of each text; one longer than the model's context (or leaving no room for a single new
    token) is refused with the lengths."""
    fmt = TaskFormatter(ctx.tokenizer)
    prompts = [fmt.tts_prompt_ids(t) for t in texts]
    context = model_context(ctx)
    if context is not None:
        for text, prompt in zip(texts, prompts):
            if len(prompt) >= context:
                raise PromptTooLongError(
                    f"tts: the prompt of {text[:60]!r} has {len(prompt)} tokens but the model's context "
                    f"(max_position_embeddings) is {context}: shorten the text or use a model with a longer context")
    return prompts


@dataclass
class GeneratedSpeech:
    units: list[int]  # deduplicated unit ids, before end-of-audio
    stopped: bool  # end-of-audio was generated


def synthesize_units(ctx, texts: list[str], max_new_tokens: int,
                     no_repeat_ngram_size: int = 0) -> list[GeneratedSpeech]:
    """The model's (deduplicated) unit sequence for each text, greedy with the KV cache, and whether it emitted
    end-of-audio before max_new_tokens ran out."""
    tok = ctx.tokenizer
    prompts = tts_prompts(ctx, texts, max_new_tokens)
    context = model_context(ctx)
    out: list[GeneratedSpeech] = []
    for chunk in ctx.batches(prompts, "tts units"):
        budget = max_new_tokens
        if context is not None:  # never past the context: the rows that would need more "did not stop"
            budget = min(budget, context - max(map(len, chunk)))
        new = generate_batch(ctx, list(chunk), budget, no_repeat_ngram_size=no_repeat_ngram_size)
        for row in new.tolist():
            if tok.eos_id in row:
                row = row[: row.index(tok.eos_id)]
            stopped = tok.eoa_id in row
            if stopped:
                row = row[: row.index(tok.eoa_id)]
            out.append(GeneratedSpeech(tok.decode_units(row), stopped))
    return out


def stop_metrics(generated: list[GeneratedSpeech], reference_lengths: list[int],
                 tolerance: float = STOP_TOLERANCE) -> dict[str, float]:
    """n_did_not_stop, stop_rate (end-of-audio within +-tolerance of the reference length) and mean lengths."""
    if len(generated) != len(reference_lengths):
        raise ValueError(f"{len(generated)} generated sequences but {len(reference_lengths)} reference lengths")
    n = len(generated)
    good = sum(g.stopped and abs(len(g.units) - r) <= tolerance * r for g, r in zip(generated, reference_lengths))
    return {"n_did_not_stop": sum(not g.stopped for g in generated), "stop_rate": good / n if n else float("nan"),
            "mean_units_generated": sum(len(g.units) for g in generated) / n if n else float("nan"),
            "mean_units_reference": sum(reference_lengths) / n if n else float("nan")}


def _score(ctx, hyps: list[str], refs: list[str]) -> tuple[float, float]:
    scorer = TranscriptErrorRates(ctx.normalizer)
    scorer.update(hyps, refs)
    s = scorer.compute()
    return float(s["wer"]), float(s["cer"])


def evaluate_tts(ctx, *, split: str, limit: int | None, max_new_tokens: int,
                 vocoders: Mapping[str, Mapping[str, Any] | None], recognizer: Mapping[str, Any] | str,
                 ground_truth: bool, resynthesis: bool, save_audio: int, n_examples: int,
                 no_repeat_ngram_size: int) -> dict:
    from most_lightning.audio.io import encode_audio
    from most_lightning.audio.units import dedup_units

    vocoders = {name: spec for name, spec in (vocoders or {}).items() if spec is not None}  # name: null drops one
    if not vocoders:
        raise ValueError("tts: no vocoder (eval.tasks.tts.vocoders is empty): name at least one, e.g. "
                         "unit_mel: {kind: unit_mel}")
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
    generated = synthesize_units(ctx, refs, max_new_tokens, no_repeat_ngram_size)
    metrics |= stop_metrics(generated, [len(dedup_units(u.units)) for u in utts])
    # did-not-stop sequences are never vocoded: they count as empty transcripts (all deletions)
    units = [g.units if g.stopped else [] for g in generated]
    metrics["n_empty_unit_outputs"] = sum(not u for u in units)  # scored as errors (empty transcript)
    audio_dir = ctx.output_dir / "tts_audio"
    for name, spec in vocoders.items():
        vocoder = build_vocoder(ctx, name, spec)
        waves = [vocoder(u, deduplicated=True) if u else torch.zeros(0) for u in units]
        hyps = rec.transcribe(waves)
        metrics[f"wer_{name}"], metrics[f"cer_{name}"] = _score(ctx, hyps, refs)
        examples[name] = [{"reference": r, "hypothesis": h} for r, h in zip(refs, hyps)][:n_examples]
        if resynthesis:
            resynth = [resynthesize(vocoder, u.units) for u in utts]
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
            "settings": {"split": split, "limit": limit, "recognizer": recognizer, "vocoders": list(vocoders),
                         "max_new_tokens": max_new_tokens, "no_repeat_ngram_size": no_repeat_ngram_size}}


def resynthesize(vocoder, units: list[int]):
    """The vocoder's speech from an utterance's true units: with their run lengths where the vocoder takes them
    (UnitMelVocoder), else deduplicated as the model's output is."""
    from most_lightning.audio.unit_mel_vocoder import UnitMelVocoder
    from most_lightning.audio.units import dedup_units

    if isinstance(vocoder, UnitMelVocoder):
        return vocoder(units, deduplicated=False)
    return vocoder(dedup_units(units), deduplicated=True)


def vocoder_rate(vocoder) -> int:
    return int(getattr(getattr(vocoder, "config", None), "sample_rate", 16_000))
