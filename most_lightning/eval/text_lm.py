"""Text perplexity on held-out sentences: exp(mean token NLL) of BOS + text + EOS, loss on all but BOS."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from most_lightning.data.collate import collate_teacher_forced
from most_lightning.data.tasks import TaskFormatter


def held_out_sentences(ctx, split: str, limit: int | None, text_file: str | None) -> list[str]:
    """Sentences from a text file (one per line) or the transcripts of a speech split (unseen in training)."""
    if text_file:
        path = Path(text_file)
        if not path.is_file():
            raise FileNotFoundError(f"text_ppl.text_file={text_file}: no such file (one sentence per line)")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        sentences = [line for line in lines if line]
    else:
        records, _ = ctx.datamodule.speech_records(split)
        sentences = list(dict.fromkeys(r.transcript for r in records))  # one per sentence, in order
    return sentences[:limit] if limit is not None else sentences


@torch.no_grad()
def evaluate_text_perplexity(ctx, *, split: str, limit: int | None, text_file: str | None) -> dict:
    sentences = held_out_sentences(ctx, split, limit, text_file)
    if not sentences:
        raise ValueError(f"text_ppl: no sentences in {'text_file ' + text_file if text_file else 'split ' + split}")
    fmt = TaskFormatter(ctx.tokenizer)
    tok = ctx.tokenizer
    total, count = 0.0, 0
    for chunk in ctx.batches(sentences, "text ppl"):
        batch = collate_teacher_forced([fmt.text_lm(s) for s in chunk], tok.pad_id, tok.modality_of)
        out = ctx.model(batch["input_ids"].to(ctx.device), batch["modality"].to(ctx.device),
                        attention_mask=batch["attention_mask"].to(ctx.device),
                        labels=batch["labels"].to(ctx.device), compute_logits=False)
        s, n = out.token_losses.sum_and_count()
        total, count = total + float(s), count + int(n)
    nll = total / count
    return {"metrics": {"nll": nll, "perplexity": math.exp(nll), "n_sentences": len(sentences), "n_tokens": count},
            "settings": {"split": None if text_file else split, "text_file": text_file, "limit": limit}}
