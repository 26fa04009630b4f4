"""Minimal-pair scoring: a real tiny model's sequence log-likelihoods against F.cross_entropy over its logits, the
pair comparison against a hand-computed bigram model, the benchmark layouts, and the flite demo sets."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from eval_fixtures import reference_nll, run_eval_cli, task_settings, tiny_run, untrained_tiny_model  # noqa: F401
from most_lightning.eval.context import EvalContext
from most_lightning.eval.minimal_pairs import (evaluate_minimal_pairs, read_paired_wavs, read_zerospeech,
                                               unit_log_likelihoods)
from most_lightning.metrics.scores import pair_accuracy
from most_lightning.model.token_losses import shifted_token_losses

needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="needs the flite program (setup.sh)")


class BigramModel(torch.nn.Module):
    """logits of the next token = table[current token]: the likelihood of any sequence is known by hand. Like
    MoSTForCausalLM, given labels it returns the per-token losses of its logits (the scorer reads nothing else)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, modality, attention_mask=None, labels=None, **_):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits, token_losses=shifted_token_losses(logits, labels, modality))


class SegmentUnits:
    """Fake front end: each 0.1 s segment of constant value k/10 is unit k (no dedup of its own)."""

    sample_rate = 16000

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        seg = wave[: len(wave) // 1600 * 1600].reshape(-1, 1600).mean(1)
        return torch.round(seg * 10).long()


def _ascending_table(tok) -> torch.Tensor:
    """Prefers boa -> unit 1 -> unit 2 -> unit 3 -> eoa."""
    table = torch.zeros(tok.vocab_size, tok.vocab_size)
    unit = lambda u: tok.n_text + u  # noqa: E731
    table[tok.bos_id, tok.boa_id] = 4.0
    table[tok.boa_id, unit(1)] = 3.0
    for u in range(1, 3):
        table[unit(u), unit(u + 1)] = 3.0
    table[unit(3), tok.eoa_id] = 3.0
    return table


def test_model_log_likelihoods_match_cross_entropy_over_its_logits(toy_tokenizer):
    # the scorer reads the model's own loss (labels=...); the oracle scores each sequence alone, unpadded
    tok = toy_tokenizer
    model = untrained_tiny_model(tok.vocab_size)
    ctx = EvalContext(model=model, tokenizer=tok, batch_size=2, progress=False)
    seqs = [[1, 2, 3, 4, 5], [3, 1], [2], [9, 8, 7]]  # padded batches of unequal rows
    got = unit_log_likelihoods(ctx, seqs)
    assert len(got) == len(seqs)
    for seq, (ll, n) in zip(seqs, got):
        nll, count = reference_nll(model, [tok.bos_id, *tok.encode_units(seq)], tok.modality_of)
        assert ll == pytest.approx(-nll, abs=1e-4) and n == count
    assert len({round(ll / n, 4) for ll, n in got}) == len(seqs)  # the sequences are told apart


def test_log_likelihood_and_accuracy_match_hand_computation(toy_tokenizer):
    tok = toy_tokenizer
    table = _ascending_table(tok)
    ctx = EvalContext(model=BigramModel(table), tokenizer=tok, batch_size=2, progress=False)
    seqs = [[1, 2, 3], [3, 1, 2], [2]]
    got = unit_log_likelihoods(ctx, seqs)
    logp = torch.log_softmax(table.double(), -1)
    for seq, (ll, n) in zip(seqs, got):
        ids = [tok.bos_id, tok.boa_id, *(tok.n_text + u for u in seq), tok.eoa_id]
        expected = sum(float(logp[a, b]) for a, b in zip(ids, ids[1:]))
        assert ll == pytest.approx(expected, abs=1e-4) and n == len(ids) - 1
    # correct [1,2,3] beats [3,1,2]; ties count one half; length normalisation can flip a comparison
    assert pair_accuracy([(got[0], got[1])]) == {"acc_sum": 1.0, "acc_mean": 1.0}
    assert pair_accuracy([((-2.0, 2), (-2.0, 2)), ((-2.0, 1), (-3.0, 5))]) == {"acc_sum": 0.75, "acc_mean": 0.25}


def _wav(path: Path, units: list[int]) -> None:
    sf.write(path, np.repeat(np.array(units, dtype=np.float32) / 10, 1600), 16000)


def test_zerospeech_layout_end_to_end_with_a_known_answer(tmp_path, toy_tokenizer):
    d = tmp_path / "lexical" / "dev"
    d.mkdir(parents=True)
    rows = [("1", "a_w", 1, [1, 2, 3]), ("1", "a_nw", 0, [3, 2, 1]),   # correct wins
            ("2", "b_w", 1, [2, 1, 3]), ("2", "b_nw", 0, [1, 2, 3]),   # corrupted wins
            ("3", "c_w", 1, [1, 2, 3]), ("3", "c_nw", 0, None)]        # audio missing: skipped, counted
    with (d / "gold.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "filename", "voice", "frequency", "word", "correct"])
        for item, name, correct, units in rows:
            w.writerow([item, name, "v1", 10, name, correct])
            if units:
                _wav(d / f"{name}.wav", units)
    assert len(read_zerospeech(d)) == 3
    ctx = EvalContext(model=BigramModel(_ascending_table(toy_tokenizer)), tokenizer=toy_tokenizer, progress=False)
    ctx.cache["unit_extractor"] = SegmentUnits()
    m = evaluate_minimal_pairs(
        ctx, **task_settings("minimal_pairs", sets={"swuggy": {"layout": "zerospeech", "path": str(d)}}))["metrics"]
    assert m == {"swuggy_n_pairs": 2, "swuggy_n_pairs_skipped": 1, "swuggy_acc_sum": 0.5, "swuggy_acc_mean": 0.5}


def test_paired_wavs_layout_and_clear_errors(tmp_path):
    _wav(tmp_path / "s1_correct.wav", [1])
    _wav(tmp_path / "s1_incorrect.wav", [2])
    pairs = read_paired_wavs(tmp_path)
    assert [(p.key, p.correct.name, p.incorrect.name) for p in pairs] == [("s1", "s1_correct.wav", "s1_incorrect.wav")]
    with pytest.raises(ValueError, match="correct_suffix"):
        read_paired_wavs(tmp_path, correct_suffix="_pos")
    with pytest.raises(FileNotFoundError, match="gold.csv"):
        read_zerospeech(tmp_path)


@needs_flite
def test_demo_lexical_set_has_nonwords_outside_the_vocabulary(tmp_path):
    from most_lightning.eval.demo_pairs import build_demo_pairs

    train = ["the garden was beautiful today", "a garden needs water and light", "water flows downhill"]
    out = build_demo_pairs("lexical", tmp_path / "lex", [], train, n_items=3)
    pairs = read_zerospeech(out)
    assert len(pairs) == 3
    with (out / "gold.csv").open() as f:
        rows = list(csv.DictReader(f))
    vocab = {w for t in train for w in t.split()}
    assert all((r["word"] in vocab) == (r["correct"] == "1") for r in rows)
    assert all(p.correct.is_file() and p.incorrect.is_file() for p in pairs)


@needs_flite
@pytest.mark.slow
def test_speech_lm_suite_through_the_entry_point(tiny_run, tmp_path):
    out, _ = run_eval_cli(tiny_run, tmp_path / "eval", "eval=speech_lm",
                          "eval.tasks.minimal_pairs.sets.demo_lexical.n_items=4",
                          "eval.tasks.minimal_pairs.sets.demo_syntactic.n_items=3",
                          "eval.tasks.minimal_pairs.sets.demo_shuffled.n_items=3")
    m = json.loads((out / "eval_report.json").read_text())["tasks"]["minimal_pairs"]["metrics"]
    for name, n in (("demo_lexical", 4), ("demo_syntactic", 3), ("demo_shuffled", 3)):
        assert m[f"{name}_n_pairs"] == n and m[f"{name}_n_pairs_skipped"] == 0
        for key in ("acc_sum", "acc_mean"):
            assert 0.0 <= m[f"{name}_{key}"] <= 1.0 and (m[f"{name}_{key}"] * 2 * n) % 1 == 0
