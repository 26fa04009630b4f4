"""Eval suites compose from one yaml per task (conf/eval/tasks/<task>.yaml) and the suite-wide settings: each
task's yaml names exactly its function's keyword-only parameters, which have no defaults of their own, and the
driver refuses an unknown, missing or unset setting by name before any model work."""

from __future__ import annotations

import inspect

import pytest

from conftest import CONF_DIR, compose_run_config
from eval_fixtures import task_settings
from most_lightning.eval.driver import _task_registry, suite_tasks
from most_lightning.eval.minimal_pairs import evaluate_minimal_pairs

SUITES = sorted(p.stem for p in (CONF_DIR / "eval").glob("*.yaml"))
# docs/evaluation.md's table of suites
SUITE_TASKS = {"default": ["asr", "text_ppl"], "asr": ["asr"], "tts": ["tts"], "speech_lm": ["minimal_pairs"],
               "spoken_qa": ["spoken_qa"], "text": ["lm_eval", "text_ppl"],
               "full": ["asr", "minimal_pairs", "text_ppl", "tts"]}
# settings a suite leaves at ??? for the command line to give
UNSET = {"spoken_qa": "eval.tasks.spoken_qa.sets.llama_questions.path", "text": "eval.tasks.lm_eval.tasks"}
GIVEN = {"spoken_qa": ["eval.tasks.spoken_qa.sets.llama_questions.path=/q.jsonl"],
         "text": ["eval.tasks.lm_eval.tasks=[tiny]"]}


def test_every_suite_is_listed():
    assert SUITES == sorted(SUITE_TASKS)


@pytest.mark.parametrize("suite", sorted(SUITE_TASKS))
def test_suite_composes_with_the_tasks_yaml_settings(suite, tmp_path):
    if suite in UNSET:
        cfg = compose_run_config(["mode=eval", f"eval={suite}"], tmp_path)
        with pytest.raises(ValueError, match=f"needs a value for .*{UNSET[suite]}"):
            suite_tasks(cfg.eval)
    cfg = compose_run_config(["mode=eval", f"eval={suite}", *GIVEN.get(suite, [])], tmp_path)
    assert cfg.eval.name == suite and cfg.eval.batch_size == 8 and cfg.eval.normalizer.lowercase is True
    tasks = suite_tasks(cfg.eval)
    assert sorted(tasks) == SUITE_TASKS[suite]
    for name, settings in tasks.items():
        if suite not in GIVEN:
            assert settings == task_settings(name)


@pytest.mark.parametrize("task", sorted(_task_registry()))
def test_task_yaml_names_exactly_the_functions_keyword_only_parameters(task):
    params = list(inspect.signature(_task_registry()[task]).parameters.values())
    assert [p.kind for p in params[1:]] == [inspect.Parameter.KEYWORD_ONLY] * (len(params) - 1)
    assert all(p.default is inspect.Parameter.empty for p in params)  # the yaml is the one place of each default
    assert sorted(p.name for p in params[1:]) == sorted(task_settings(task))


def test_full_reuses_the_tts_suites_settings(tmp_path):
    full = suite_tasks(compose_run_config(["mode=eval", "eval=full"], tmp_path).eval)
    tts = suite_tasks(compose_run_config(["mode=eval", "eval=tts"], tmp_path).eval)
    assert full["tts"] == tts["tts"] and full["tts"]["vocoders"]["unit_mel"]["kind"] == "unit_mel"


def test_unknown_missing_and_unset_settings_are_named(tmp_path):
    cfg = compose_run_config(["mode=eval", "eval=asr", "+eval.tasks.asr.beam_width=2"], tmp_path)
    with pytest.raises(ValueError, match=r"eval.tasks.asr has unknown setting\(s\) \['beam_width'\]"):
        suite_tasks(cfg.eval)
    cfg = compose_run_config(["mode=eval", "eval=asr", "~eval.tasks.asr.beam_size"], tmp_path)
    with pytest.raises(ValueError, match=r"eval.tasks.asr lacks setting\(s\) \['beam_size'\]"):
        suite_tasks(cfg.eval)
    cfg = compose_run_config(["mode=eval", "eval=tts", "eval.tasks.tts.split=???"], tmp_path)
    with pytest.raises(ValueError, match=r"needs a value for \['eval.tasks.tts.split'\]"):
        suite_tasks(cfg.eval)


def test_a_demo_pair_set_needs_its_size():
    sets = {"mine": {"layout": "zerospeech", "demo": "lexical"}}
    with pytest.raises(ValueError, match="minimal_pairs.sets.mine: a demo set needs n_items"):
        evaluate_minimal_pairs(None, **task_settings("minimal_pairs", sets=sets))
