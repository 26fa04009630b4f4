"""The comparison report: table values come from the reports, the published reference row matches metrics."""

from __future__ import annotations

import json

import pytest

from most_lightning.eval.compare import compare, reference_value
from most_lightning.eval.report import write_report


def _report(router: str, wer: float, ppl: float) -> dict:
    return {"suite": "default", "router": router, "checkpoint": {"path": "x.ckpt", "global_step": 5},
            "tasks": {"asr": {"metrics": {"wer_greedy": wer, "n_utterances": 10}},
                      "text_ppl": {"metrics": {"perplexity": ppl}}}}


def test_compare_writes_table_json_and_one_plot_per_metric(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_report(_report("vanilla", 0.9, 300.0), a)
    write_report(_report("modality_aware", 0.8, 250.0), b)
    table = compare([a, b / "eval_report.json"], tmp_path / "out", labels=["V", "MA"])
    assert table["metrics"] == ["asr/wer_greedy", "text_ppl/perplexity"]  # counts are not plotted
    assert [r["values"]["asr/wer_greedy"] for r in table["rows"]] == [0.9, 0.8]
    assert table["reference"] == {"asr/wer_greedy": {"value": 0.02, "what": "ASR WER, LibriSpeech test-clean"}}
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| V | 0.9 | 300 |" in md and "| MA | 0.8 | 250 |" in md
    assert "| MoST (published, full scale) | 0.02 | – |" in md
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())["rows"][1]["label"] == "MA"
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["asr_wer_greedy.png", "text_ppl_perplexity.png"]
    assert (tmp_path / "out" / "asr_wer_greedy.png").read_bytes()[:4] == b"\x89PNG"


def test_reference_numbers_are_the_published_ones():
    assert reference_value("minimal_pairs/swuggy_acc_mean")[0] == pytest.approx(0.7528)
    assert reference_value("spoken_qa/webquestions_s2s_exact")[0] == pytest.approx(0.447)
    assert reference_value("tts/wer_griffin_lim")[0] == pytest.approx(0.060)
    assert reference_value("text_ppl/perplexity") is None
    # the judge's and the vocoder's ceilings are not the model's TTS WER
    assert reference_value("tts/wer_ground_truth") is None and reference_value("tts/wer_resynth_mean_mel") is None


def test_compare_names_a_missing_report(tmp_path):
    with pytest.raises(FileNotFoundError, match="no eval report"):
        compare([tmp_path / "nowhere"], tmp_path / "out")
    with pytest.raises(ValueError, match="labels"):
        write_report(_report("v", 1.0, 1.0), tmp_path / "a")
        compare([tmp_path / "a"], tmp_path / "out", labels=["x", "y"])
