"""The ASR eval task: transcribe a prepared split's speech (greedy or beam search, KV cache) and score WER/CER
(most_lightning.metrics.transcripts)."""

from __future__ import annotations

from typing import Sequence

import torch

from most_lightning.metrics.transcripts import TranscriptErrorRates
from most_lightning.text.tokenizer import decode_text_rows

ASR_DECODINGS = ("greedy", "beam")


def generate_batch(ctx, prompts: list[list[int]], max_new_tokens: int, decoding: str = "greedy",
                   beam_size: int = 4, length_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> torch.Tensor:
    """Left-pad token prompts and generate (greedy or beam) with the KV cache; returns the new ids [B, N]."""
    from most_lightning.data.tasks import GenerationExample

    return generate_examples(ctx, [GenerationExample(p, "", "") for p in prompts], max_new_tokens, decoding,
                             beam_size, length_penalty, no_repeat_ngram_size)


def generate_examples(ctx, examples: list, max_new_tokens: int, decoding: str = "greedy", beam_size: int = 4,
                      length_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> torch.Tensor:
    """Generation examples -> new ids [B, N]. Continuous-audio examples (MoST-C) get their frames spliced into
    the prompt embeddings by the model's audio input; unit prompts are embedded by the model."""
    from most_lightning.data.collate import collate_asr_generation
    from most_lightning.model.generation import beam_generate, greedy_generate

    tok = ctx.tokenizer
    batch = collate_asr_generation(examples, tok.pad_id, tok.modality_of)
    args = (ctx.model, batch["prompt_ids"].to(ctx.device), batch["prompt_modality"].to(ctx.device),
            batch["prompt_mask"].to(ctx.device), max_new_tokens)
    embeds = ctx.prompt_embeds(batch) if hasattr(ctx, "prompt_embeds") else None
    common = dict(eos_id=tok.eos_id, pad_id=tok.pad_id, modality_of=tok.modality_of, inputs_embeds=embeds)
    if decoding == "greedy":
        return greedy_generate(*args, **common, no_repeat_ngram_size=no_repeat_ngram_size)
    if no_repeat_ngram_size:
        raise ValueError("no_repeat_ngram_size is implemented for greedy decoding only")
    if decoding == "beam":
        return beam_generate(*args, **common, beam_size=beam_size, length_penalty=length_penalty)
    raise ValueError(f"decoding={decoding!r}: allowed values are {ASR_DECODINGS}")


def evaluate_asr(ctx, *, split: str, limit: int | None, decodings: Sequence[str], beam_size: int,
                 length_penalty: float, max_new_tokens: int, n_examples: int) -> dict:
    """Transcribe a prepared split's speech and score WER/CER per decoding. The prompts carry the utterances'
    units, or for a continuous model (audio=continuous, MoST-C) frame slots filled with its encoder's projected
    features. Bad samples (missing audio, empty transcripts, bad units) are skipped by the data config's
    on_bad_sample policy and counted."""
    unknown = [d for d in decodings if d not in ASR_DECODINGS]
    if unknown:
        raise ValueError(f"asr.decodings has {unknown}; allowed: {ASR_DECODINGS}")
    examples = ctx.datamodule.asr_generation_examples(split, limit=limit)
    n_skipped = sum(e.n_skipped for e in examples)
    metrics: dict[str, float] = {}
    shown: dict[str, list[dict[str, str]]] = {}
    for decoding in decodings:
        scorer = TranscriptErrorRates(ctx.normalizer)
        n_empty = 0
        shown[decoding] = []
        for chunk in ctx.batches(examples, f"asr {decoding}"):
            new = generate_examples(ctx, list(chunk), max_new_tokens, decoding, beam_size, length_penalty)
            hyps = decode_text_rows(ctx.tokenizer, new)
            n_empty += sum(not ctx.normalizer(h) for h in hyps)  # scored as all-deletion errors
            scorer.update(hyps, [e.reference_text for e in chunk])
            for e, h in zip(chunk, hyps):
                if len(shown[decoding]) < n_examples:
                    shown[decoding].append({"key": e.key, "reference": e.reference_text, "hypothesis": h})
        scores = scorer.compute()
        metrics[f"wer_{decoding}"] = float(scores["wer"])
        metrics[f"cer_{decoding}"] = float(scores["cer"])
        metrics[f"n_empty_hypotheses_{decoding}"] = n_empty
        metrics["n_empty_references"] = int(scores["n_empty_references"])
        metrics["n_utterances"] = int(scores["n_utterances"])
    metrics["n_skipped_samples"] = n_skipped
    return {"metrics": metrics, "examples": shown,
            "settings": {"split": split, "limit": limit, "beam_size": beam_size, "max_new_tokens": max_new_tokens,
                         "speech_input": "continuous" if getattr(ctx, "continuous", False) else "units"}}
