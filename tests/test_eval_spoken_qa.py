"""Spoken QA: matching rules, the three file styles, and the suite through the entry point."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from eval_fixtures import run_eval_cli, tiny_run  # noqa: F401
from most_lightning.eval.spoken_qa import read_questions
from most_lightning.metrics.normalize import TextNormalizer
from most_lightning.metrics.scores import contains_answer, exact_match

QA_NORM = TextNormalizer(remove_articles=True)
needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="needs the flite program (setup.sh)")


@pytest.mark.parametrize("prediction, answers, exact, contains", [
    ("Paris", ["paris"], True, True),
    ("The Beatles!", ["Beatles"], True, True),                       # articles and punctuation do not count
    ("it is paris of course", ["Paris"], False, True),
    ("parisian", ["Paris"], False, False),                           # whole words only
    ("new york city", ["New York", "NYC"], False, True),
    ("nyc", ["New York", "NYC"], True, True),                        # any alias
    ("", ["Paris"], False, False),                                   # empty prediction is an error
    ("the", ["a"], False, False),                                    # nothing left after normalising
])
def test_matching_rules(prediction, answers, exact, contains):
    assert exact_match(prediction, answers, QA_NORM) is exact
    assert contains_answer(prediction, answers, QA_NORM) is contains


def test_number_words_option_matches_digits():
    norm = TextNormalizer(remove_articles=True, numbers="words")
    assert exact_match("twenty one", ["21"], norm) and not exact_match("twenty one", ["21"], QA_NORM)


def test_reads_llama_triviaqa_and_webquestions_styles(tmp_path):
    items = [{"Questions": "What is the capital of France?", "Answer": "Paris", "audio": "q0.wav"},
             {"question": "Who wrote Hamlet?", "answer": {"value": "William Shakespeare", "aliases": ["Shakespeare"]}},
             {"utterance": "what currency does japan use?", "answers": ["Yen", "Japanese yen"], "id": "wq1"},
             {"question": "No answer here?"}]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items))
    questions, skipped = read_questions(path)
    assert skipped == 1
    assert [q.answers for q in questions] == [["Paris"], ["William Shakespeare", "Shakespeare"], ["Yen", "Japanese yen"]]
    assert questions[0].audio == tmp_path / "q0.wav" and questions[1].audio is None and questions[2].key == "wq1"
    (tmp_path / "qa.json").write_text(json.dumps(items[:1]))  # a json list works too
    assert read_questions(tmp_path / "qa.json")[0][0].text == "What is the capital of France?"


@needs_flite
@pytest.mark.slow
def test_spoken_qa_suite_through_the_entry_point(tiny_run, tmp_path):
    subprocess.run(["flite", "-voice", "rms", "-t", "What color is the sky?", "-o", str(tmp_path / "q1.wav")],
                   check=True)
    items = [{"question": "What color is the sky?", "answers": ["blue"], "audio": "q1.wav"},
             {"question": "How many legs does a dog have?", "answers": ["four", "4"]},          # voiced by flite
             {"question": "Where is the file?", "answers": ["here"], "audio": "missing.wav"},  # skipped, counted
             {"question": "No answer?", "answers": []}]                                        # skipped, counted
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    out, _ = run_eval_cli(tiny_run, tmp_path / "eval", "eval=spoken_qa",
                          f"eval.tasks.spoken_qa.sets.llama_questions.path={tmp_path / 'qa.jsonl'}",
                          "eval.tasks.spoken_qa.max_new_units=20", "eval.tasks.spoken_qa.vocoder.fit_utterances=10")
    report = json.loads((out / "eval_report.json").read_text())["tasks"]["spoken_qa"]
    m = report["metrics"]
    assert m["llama_questions_n_questions"] == 2 and m["llama_questions_n_skipped"] == 2
    for mode in ("s2t", "s2s"):
        ex = report["examples"][f"llama_questions_{mode}"]
        expected = sum(exact_match(e["prediction"], e["answers"], QA_NORM) for e in ex) / 2
        assert m[f"llama_questions_{mode}_exact"] == pytest.approx(expected)
        assert m[f"llama_questions_{mode}_exact"] <= m[f"llama_questions_{mode}_contains"] <= 1
    assert (out / "qa_audio" / "llama_questions" / "1.wav").is_file()
