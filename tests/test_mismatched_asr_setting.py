"""Mismatched-audio ASR (the text-prior baseline) is one setting, `test_asr_mismatched`: it adds the test pass
(run.py) and the validation curve's baseline (callbacks.asr_wer_curve); the data group has no switch of its own
and the LitModule tells the passes apart by the batches' own flag."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hydra.errors import ConfigCompositionException

from conftest import compose_run_config


@pytest.mark.parametrize("experiment", ["demo_long", "demo_long_asr"])
def test_one_switch_drives_the_validation_curve_baseline(tmp_path, experiment):
    on = compose_run_config([f"experiment={experiment}"], tmp_path)
    off = compose_run_config([f"experiment={experiment}", "test_asr_mismatched=false"], tmp_path)
    assert on.test_asr_mismatched is True and on.callbacks.asr_wer_curve.mismatched is True
    assert off.test_asr_mismatched is False and off.callbacks.asr_wer_curve.mismatched is False


def test_the_data_group_has_no_switch_of_its_own(tmp_path):
    assert "test_asr_mismatched" not in compose_run_config([], tmp_path).data
    with pytest.raises(ConfigCompositionException, match="test_asr_mismatched"):
        compose_run_config(["data.test_asr_mismatched=true"], tmp_path)


@pytest.mark.parametrize("add", [False, True])
def test_run_py_adds_the_mismatched_test_loader_only_when_asked(add):
    from run import make_test_loaders

    calls = []
    datamodule = SimpleNamespace(evaluation=SimpleNamespace(test_limit=7), test_dataloader=lambda: ["asr", "tts+text"],
                                 asr_generation_dataloader=lambda *a, **kw: calls.append((a, kw)) or "mismatched")
    loaders = make_test_loaders(datamodule, add)
    assert loaders == ["asr", "tts+text", "mismatched"] if add else ["asr", "tts+text"]
    assert calls == ([(("test",), {"mismatched": True, "limit": 7})] if add else [])
