"""Eval phase 1: the normaliser, WER/CER against jiwer, beam search against exhaustive search, checkpoint
loading errors, and the `mode=eval` entry point on a tiny trained model."""

from __future__ import annotations

import itertools
import json
import math
import jiwer
import pytest
import torch

from eval_fixtures import run_eval_cli, tiny_run  # noqa: F401
from most_lightning.metrics.normalize import TextNormalizer, integer_to_words
from most_lightning.metrics.transcripts import TranscriptErrorRates


# ---------------------------------------------------------------------------------------------- normaliser
@pytest.mark.parametrize("options, text, expected", [
    ({}, "Hello, World!  It's 'quoted' here.", "hello world it's quoted here"),
    ({}, "rock-and-roll_fan", "rock and roll fan"),
    ({"lowercase": False}, "Hello, World!", "Hello World"),
    ({"strip_punctuation": False}, "Hello,   World!", "hello, world!"),
    ({"numbers": "words"}, "In 1905 he had 21 cats and 3.5 dogs", "in one thousand nine hundred five he had twenty one "
                                                                  "cats and three point five dogs"),
    ({"numbers": "words"}, "1,000,000 people", "one million people"),
    ({"remove_articles": True}, "The cat ate an apple", "cat ate apple"),
    ({}, "Ｆｕｌｌｗｉｄｔｈ", "fullwidth"),
])
def test_normalizer_cases(options, text, expected):
    assert TextNormalizer(**options)(text) == expected


def test_integer_to_words_hand_values():
    assert integer_to_words(0) == "zero"
    assert integer_to_words(15) == "fifteen"
    assert integer_to_words(40) == "forty"
    assert integer_to_words(99) == "ninety nine"
    assert integer_to_words(100) == "one hundred"
    assert integer_to_words(2026) == "two thousand twenty six"
    assert integer_to_words(7_000_013) == "seven million thirteen"


def test_normalizer_rejects_unknown_options():
    with pytest.raises(ValueError, match="numbers"):
        TextNormalizer(numbers="roman")
    with pytest.raises(ValueError, match="unknown normalizer option"):
        TextNormalizer.from_any({"lowercase": True, "stem": True})


# ---------------------------------------------------------------------------------------------- WER/CER
REFS = ["The cat sat on the mat.", "A quick brown fox", "It's 21 o'clock", "hello world"]
HYPS = ["the cat sat on a mat", "quick brown fox jumps", "its twenty one o'clock", ""]


@pytest.mark.parametrize("options", [{}, {"numbers": "words"}, {"lowercase": False, "strip_punctuation": False}])
def test_wer_cer_match_jiwer_on_fixed_strings(options):
    norm = TextNormalizer(**options)
    metric = TranscriptErrorRates(norm)
    metric.update(HYPS[:2], REFS[:2])
    metric.update(HYPS[2:], REFS[2:])  # corpus level across updates
    scores = metric.compute()
    refs, hyps = [norm(r) for r in REFS], [norm(h) for h in HYPS]
    assert float(scores["wer"]) == pytest.approx(jiwer.wer(refs, hyps))
    assert float(scores["cer"]) == pytest.approx(jiwer.cer(refs, hyps))
    assert int(scores["n_utterances"]) == 4


def test_empty_hypothesis_scores_as_deletions_and_empty_reference_is_counted():
    metric = TranscriptErrorRates()
    metric.update(["", "x"], ["two words", "?!"])  # "?!" is empty after normalisation
    scores = metric.compute()
    assert float(scores["wer"]) == 1.0
    assert int(scores["n_empty_references"]) == 1 and int(scores["n_utterances"]) == 1


# ---------------------------------------------------------------------------------------------- beam search
def _tiny_model(vocab: int, seed: int = 0):
    from most_lightning.model import MoSTConfig, MoSTForCausalLM

    torch.manual_seed(seed)
    cfg = MoSTConfig.from_preset("tiny", vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2,
                                 intermediate_size=64, moe_intermediate_size=16, kv_lora_rank=8,
                                 qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    model = MoSTForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper distributions than the default init, so search matters
        model.lm_head.weight.mul_(30)
    return model


@torch.no_grad()
def _sequence_logprob(model, prompt: list[int], seq: list[int]) -> float:
    ids = torch.tensor([prompt + seq])
    logp = torch.log_softmax(model(ids, torch.zeros_like(ids)).logits[0].double(), -1)
    return float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(seq)))


def test_beam_size_one_is_greedy_and_batched_rows_match_single_prompts():
    from most_lightning.model.generation import beam_generate, greedy_generate

    model = _tiny_model(vocab=12)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    ids = torch.full((2, 5), 0)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, 5 - len(p):], mask[r, 5 - len(p):] = torch.tensor(p), True
    greedy = greedy_generate(model, ids, torch.zeros_like(ids), mask, 6, eos_id=11)
    beam1 = beam_generate(model, ids, torch.zeros_like(ids), mask, 6, eos_id=11, beam_size=1)
    n = min(greedy.shape[1], beam1.shape[1])
    assert torch.equal(greedy[:, :n], beam1[:, :n])
    beam4 = beam_generate(model, ids, torch.zeros_like(ids), mask, 6, eos_id=11, beam_size=4)
    for r, p in enumerate(prompts):
        alone = beam_generate(model, torch.tensor([p]), torch.zeros(1, len(p), dtype=torch.long), None, 6,
                              eos_id=11, beam_size=4)
        m = alone.shape[1]
        assert torch.equal(beam4[r, :m], alone[0])


def test_full_width_beam_finds_the_exhaustive_optimum():
    """vocab 4 (eos = 3), 3 new tokens: a beam as wide as the vocabulary^2 explores every prefix, so it must
    return the best length-normalised sequence found by enumerating all of them (the oracle)."""
    from most_lightning.model.generation import beam_generate

    vocab, eos, steps, prompt = 4, 3, 3, [0, 1, 2, 1]
    for seed in range(3):
        model = _tiny_model(vocab, seed)
        candidates = []
        for n in range(1, steps + 1):
            for body in itertools.product(range(vocab - 1), repeat=n - 1):
                candidates.append(list(body) + [eos])  # finished sequences
        candidates += [list(s) for s in itertools.product(range(vocab - 1), repeat=steps)]  # cut at max length
        best = max(candidates, key=lambda s: _sequence_logprob(model, prompt, s) / len(s))
        out = beam_generate(model, torch.tensor([prompt]), torch.zeros(1, 4, dtype=torch.long), None, steps,
                            eos_id=eos, beam_size=vocab ** 2)
        got = [t for t in out[0].tolist()]
        got = got[: got.index(eos) + 1] if eos in got else got
        assert _sequence_logprob(model, prompt, got) / len(got) == pytest.approx(
            _sequence_logprob(model, prompt, best) / len(best), abs=1e-5), (seed, got, best)


# ---------------------------------------------------------------------------------------------- entry point
@pytest.mark.slow
def test_eval_entry_point_default_suite(tiny_run, tmp_path):
    # no eval=<suite>: mode=eval runs conf/eval/default.yaml (it used to stop with "mode=eval needs a suite")
    out, _ = run_eval_cli(tiny_run, tmp_path / "eval", "eval.tasks.asr.limit=4", "eval.batch_size=3")
    report = json.loads((out / "eval_report.json").read_text())
    assert report["suite"] == "default"
    asr = report["tasks"]["asr"]["metrics"]
    assert asr["n_utterances"] == 4 and asr["n_skipped_samples"] == 0
    for key in ("wer_greedy", "cer_greedy", "wer_beam", "cer_beam"):
        assert asr[key] is not None and asr[key] >= 0, key
    # the report's WER is jiwer's on the recorded examples' normalised text (all 4 are recorded, n_examples 5)
    ex = report["tasks"]["asr"]["examples"]["greedy"]
    norm = TextNormalizer()
    assert asr["wer_greedy"] == pytest.approx(jiwer.wer([norm(e["reference"]) for e in ex],
                                                        [norm(e["hypothesis"]) or "" for e in ex]))
    ppl = report["tasks"]["text_ppl"]["metrics"]
    assert ppl["perplexity"] == pytest.approx(math.exp(ppl["nll"]))
    # a random-ish tiny model is far from a uniform guess but not perfect either
    assert 1 < ppl["perplexity"] < 3 * report["vocab_size"]
    md = (out / "eval_report.md").read_text()
    assert "| asr | wer_greedy |" in md and "| text_ppl | perplexity |" in md


@pytest.mark.slow
def test_eval_greedy_wer_equals_the_lightning_test_loop(tiny_run, tmp_path):
    """Two independent paths (MoSTLitModule.test_step during training vs mode=eval) on the same weights."""
    run_dir, _ = tiny_run
    trained = json.loads((run_dir / "metrics.json").read_text())
    out, _ = run_eval_cli(tiny_run, tmp_path / "eval", "eval=asr", "eval.tasks.asr.decodings=[greedy]",
                          "eval.tasks.asr.max_new_tokens=16")  # debug=fast's lit.evaluation.asr_max_new_tokens
    asr = json.loads((out / "eval_report.json").read_text())["tasks"]["asr"]["metrics"]
    assert asr["n_utterances"] == trained["test/asr_n_utterances"]
    assert asr["wer_greedy"] == pytest.approx(trained["test/asr_wer"], abs=1e-6)
    assert asr["cer_greedy"] == pytest.approx(trained["test/asr_cer"], abs=1e-6)


@pytest.mark.slow
def test_eval_rejects_checkpoint_of_another_config(tiny_run, tmp_path):
    _, result = run_eval_cli(tiny_run, tmp_path / "eval", "eval=asr", "model.hidden_size=96", "router=vanilla",
                             check=False)
    assert result.returncode != 0
    assert "trained with another config" in result.stderr
    assert "model.hidden_size: checkpoint 64, eval config 96" in result.stderr
    assert "router=modality_aware" in result.stderr


def test_eval_needs_a_checkpoint_path_and_a_suite(tmp_path):
    from most_lightning.eval.checkpoint import load_model_for_eval

    with pytest.raises(ValueError, match="ckpt_path="):
        load_model_for_eval(None, {}, {}, 10)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model_for_eval(str(tmp_path / "nope.ckpt"), {}, {}, 10)


def test_bare_state_dict_of_another_shape_is_a_clear_error(tmp_path):
    from most_lightning.eval.checkpoint import CheckpointMismatchError, load_model_for_eval

    model = _tiny_model(vocab=12)
    path = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    model_cfg = dict(preset="tiny", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                     moe_intermediate_size=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    router_cfg = dict(name="modality_aware")
    loaded, _ = load_model_for_eval(str(path), model_cfg, router_cfg, 12)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded(ids, torch.zeros_like(ids)).logits, model(ids, torch.zeros_like(ids)).logits)
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_model_for_eval(str(path), {**model_cfg, "intermediate_size": 48}, router_cfg, 12)
