"""lm-evaluation-harness adapter: log-likelihoods against a direct forward pass, and local task definitions
(multiple choice + generate_until) through lm_eval.simple_evaluate and through the entry point."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import ToyTokenizer
from eval_fixtures import run_eval_cli, tiny_run  # noqa: F401

lm_eval = pytest.importorskip("lm_eval")  # the eval extra; never silently skipped in CI (it is in dev too)

MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["j"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def _model(vocab: int, seed: int = 0):
    from most_lightning.model import MoSTConfig, MoSTForCausalLM

    torch.manual_seed(seed)
    cfg = MoSTConfig.from_preset("tiny", vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2,
                                 intermediate_size=64, moe_intermediate_size=16, kv_lora_rank=8,
                                 qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    model = MoSTForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


def _req(*args):
    return SimpleNamespace(args=args)


@torch.no_grad()
def _direct_logprob(model, ids: list[int], n_cont: int) -> float:
    ids_t = torch.tensor([ids])
    logp = torch.log_softmax(model(ids_t, torch.zeros_like(ids_t)).logits[0].double(), -1)  # all text
    return float(sum(logp[i - 1, ids[i]] for i in range(len(ids) - n_cont, len(ids))))


def test_loglikelihood_and_rolling_match_a_direct_forward_pass():
    from most_lightning.eval.lm_harness import MoSTHarnessLM

    tok = ToyTokenizer()  # letters a..t; spaces are dropped
    model = _model(tok.vocab_size)
    lm = MoSTHarnessLM(model, tok, batch_size=2)
    requests = [_req("abc", "de"), _req("abcdefg", "h"), _req("ab ", "cd")]  # trailing space moves over
    got = lm.loglikelihood(requests)
    expected = [_direct_logprob(model, [tok.bos_id, 0, 1, 2, 3, 4], 2),
                _direct_logprob(model, [tok.bos_id, *range(8)], 1),
                _direct_logprob(model, [tok.bos_id, 0, 1, 2, 3], 2)]
    assert [g[0] for g in got] == pytest.approx(expected, abs=1e-4)
    rolling = lm.loglikelihood_rolling([_req("abcdefgh")])[0]
    assert rolling == pytest.approx(_direct_logprob(model, [tok.bos_id, *range(8)], 8), abs=1e-4)
    # windows of 4 tokens: each token is still scored exactly once
    short = MoSTHarnessLM(model, tok, max_length=4).loglikelihood_rolling([_req("abcdefgh")])[0]
    assert short < 0 and short != pytest.approx(rolling)


def _write_tasks(tmp_path):
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(d) for d in [
        {"question": "abc", "choices": ["d", "e"], "label": 0},
        {"question": "ab", "choices": ["cc", "t"], "label": 1},
        {"question": "ba", "choices": ["a", "b", "c"], "label": 2}]))
    (tmp_path / "gen.jsonl").write_text("\n".join(json.dumps(d) for d in [
        {"question": "abc", "answer": "a"}, {"question": "ddd", "answer": "b"}]))
    (tmp_path / "tiny_mc.yaml").write_text(MC_TASK.format(data=tmp_path / "mc.jsonl"))
    (tmp_path / "tiny_gen.yaml").write_text(GEN_TASK.format(data=tmp_path / "gen.jsonl"))


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_local_tasks_through_simple_evaluate(tmp_path):
    from lm_eval.tasks import TaskManager

    from most_lightning.eval.lm_harness import MoSTHarnessLM

    _write_tasks(tmp_path)
    tok = ToyTokenizer()  # letters a..t; spaces are dropped
    lm = MoSTHarnessLM(_model(tok.vocab_size, seed=1), tok, batch_size=3)
    results = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_gen"],
                                      task_manager=TaskManager(include_path=str(tmp_path)))["results"]
    docs = [json.loads(line) for line in (tmp_path / "mc.jsonl").read_text().splitlines()]
    hits = 0
    for d in docs:  # the harness' acc: argmax of the summed log-likelihood over the choices
        scores = [lm.loglikelihood([_req(d["question"], " " + c)])[0][0] for c in d["choices"]]
        hits += int(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    assert results["tiny_mc"]["acc,none"] == pytest.approx(hits / len(docs))
    gens = lm.generate_until([_req("abc", {"until": ["j"], "max_gen_toks": 4}),
                              _req("ddd", {"until": ["j"], "max_gen_toks": 4})])
    assert all(len(g) <= 4 and "j" not in g for g in gens)
    assert results["tiny_gen"]["exact_match,none"] == pytest.approx(
        sum(g.strip() == a for g, a in zip(gens, ["a", "b"])) / 2)


@pytest.mark.slow
def test_text_suite_through_the_entry_point(tiny_run, tmp_path):
    _write_tasks(tmp_path)
    out, _ = run_eval_cli(tiny_run, tmp_path / "eval", "eval=text", "eval.tasks.lm_eval.tasks=[tiny_mc]",
                          f"eval.tasks.lm_eval.include_path={tmp_path}")
    m = json.loads((out / "eval_report.json").read_text())["tasks"]
    assert 0.0 <= m["lm_eval"]["metrics"]["tiny_mc/acc"] <= 1.0
    assert m["text_ppl"]["metrics"]["perplexity"] > 1
