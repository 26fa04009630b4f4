"""Metric plumbing: transcript normalisation + WER/CER (jiwer as the oracle), expert-load summary, LR schedule,
expert-load monitor files."""

from __future__ import annotations

import csv

import jiwer
import pytest
import torch

from most_lightning.lit.callbacks import plot_expert_load, write_expert_load_csv
from most_lightning.lit.schedule import linear_warmup_decay
from most_lightning.metrics.expert_load import ExpertLoadAccumulator
from most_lightning.metrics.transcripts import TranscriptErrorRates, normalize_transcript
from most_lightning.model import RouterStats


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hello, World!", "hello world"),
        ("  IT'S   a  'quoted'   word. ", "it's a quoted word"),
        ("Mr. Smith -- said: \"no\"?", "mr smith said no"),
        ("", ""),
    ],
)
def test_normalize_transcript(raw, expected):
    assert normalize_transcript(raw) == expected


def test_error_rates_match_jiwer_on_normalised_text():
    refs = ["The cat sat on the mat.", "A quick brown fox", "It's over!", "..."]
    hyps = ["the cat sat on mat", "a quick brown box jumps", "its over", "anything"]
    metric = TranscriptErrorRates()
    metric.update(hyps[:2], refs[:2])
    metric.update(hyps[2:], refs[2:])
    scores = metric.compute()
    kept = [(normalize_transcript(h), normalize_transcript(r)) for h, r in zip(hyps, refs) if normalize_transcript(r)]
    h, r = map(list, zip(*kept))
    assert float(scores["wer"]) == pytest.approx(jiwer.wer(r, h), rel=1e-6)  # corpus-level, not a mean of rates
    assert float(scores["cer"]) == pytest.approx(jiwer.cer(r, h), rel=1e-6)
    assert int(scores["n_utterances"]) == 3 and int(metric.n_empty_references) == 1  # "..." is left out


def test_expert_load_summary_combines_batches_by_token_count():
    acc = ExpertLoadAccumulator()
    # 4 experts, top-2; experts 2 and 3 are the audio group. Batch 1: 6 text tokens all on {0, 1};
    # 4 audio tokens all on {2, 3}. Batch 2: 2 audio tokens on {0, 2} (a vanilla-style leak).
    acc.update([RouterStats(load=torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]),
                            tokens=torch.tensor([6.0, 4.0]))])
    acc.update([RouterStats(load=torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]),
                            tokens=torch.tensor([0.0, 2.0]))])
    frac = acc.load_fraction()
    assert frac.shape == (1, 2, 4)
    assert torch.allclose(frac.sum(-1), torch.tensor([[2.0, 2.0]], dtype=frac.dtype))  # rows sum to top_k
    assert torch.allclose(frac[0, 1], torch.tensor([2, 0, 6, 4], dtype=frac.dtype) / 6)
    summary = acc.summary(audio_experts=[2, 3], layer_ids=[1])
    assert summary["audio_to_audio_group"] == pytest.approx(10 / 12)  # 2 of 12 audio slots leaked
    assert summary["text_to_text_group"] == pytest.approx(1.0)
    assert summary["load_max_over_mean_text"] == pytest.approx(2.0)  # 2 of 4 experts carry all text
    assert summary["load_max_over_mean_audio/layer_1"] == pytest.approx((6 / 6) / (12 / 6 / 4))
    assert summary["tokens_audio"] == 6


def test_linear_warmup_then_linear_decay():
    param = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = linear_warmup_decay(optimizer, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(1.0 - 0.9 * 5 / 10)
    assert lrs[14:] == pytest.approx([0.1, 0.1])  # holds at the floor after total_steps


def test_expert_load_files(tmp_path):
    frac = torch.rand(3, 2, 8)
    tokens = torch.tensor([[5.0, 7.0]] * 3)
    write_expert_load_csv(tmp_path / "load.csv", frac, tokens, [1, 2, 3], {4, 5, 6, 7})
    rows = list(csv.DictReader(open(tmp_path / "load.csv")))
    assert len(rows) == 2 * 3 * 8
    assert {r["group"] for r in rows if int(r["expert"]) >= 4} == {"audio"}
    plot_expert_load(tmp_path / "load.png", frac, [1, 2, 3], {4, 5, 6, 7}, title="t")
    assert (tmp_path / "load.png").read_bytes()[:4] == b"\x89PNG"
