"""Text perplexity scores with the model's own loss (labels=...) and equals F.cross_entropy over its logits."""

from __future__ import annotations

import math

import pytest

from eval_fixtures import reference_nll, task_settings, untrained_tiny_model
from most_lightning.eval.context import EvalContext
from most_lightning.eval.text_lm import evaluate_text_perplexity


def test_perplexity_is_the_token_mean_cross_entropy_over_the_logits(tmp_path, toy_tokenizer):
    tok = toy_tokenizer
    sentences = ["abcdef", "hij", "a", "ghhhgfedcb", "abcdef"]
    text_file = tmp_path / "held_out.txt"
    text_file.write_text("\n".join(sentences[:2]) + "\n\n" + "\n".join(sentences[2:]) + "\n")  # blank line: skipped
    model = untrained_tiny_model(tok.vocab_size)
    ctx = EvalContext(model=model, tokenizer=tok, batch_size=2, progress=False)  # padded batches
    m = evaluate_text_perplexity(ctx, **task_settings("text_ppl", text_file=str(text_file)))["metrics"]
    # oracle: each sentence alone as BOS + text + EOS, every token after BOS scored
    scores = [reference_nll(model, [tok.bos_id, *tok.encode_text(s), tok.eos_id], tok.modality_of)
              for s in sentences]
    total, count = sum(s for s, _ in scores), sum(n for _, n in scores)
    assert m["n_sentences"] == len(sentences) and m["n_tokens"] == count
    assert m["nll"] == pytest.approx(total / count, abs=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_limit_and_missing_file_errors(tmp_path, toy_tokenizer):
    text_file = tmp_path / "held_out.txt"
    text_file.write_text("abc\ndef\nghi\n")
    ctx = EvalContext(model=untrained_tiny_model(toy_tokenizer.vocab_size), tokenizer=toy_tokenizer,
                      progress=False)
    m = evaluate_text_perplexity(ctx, **task_settings("text_ppl", text_file=str(text_file), limit=2))["metrics"]
    assert m["n_tokens"] == 2 * 4
    with pytest.raises(FileNotFoundError, match="text_ppl.text_file"):
        evaluate_text_perplexity(ctx, **task_settings("text_ppl", text_file=str(tmp_path / "absent.txt")))
