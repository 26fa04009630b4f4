"""The learning-check experiments: demo_long_asr must reuse demo_long's cached corpus and shift the mix to ASR."""

from __future__ import annotations

from omegaconf import OmegaConf

from conftest import compose_run_config
from most_lightning.data import DemoCorpusRecipe

DEMO_LONG_CORPUS_HASH = "5c67e76b9a08"  # the 20k-utterance corpus the measurements in docs/learning_check.md used


def _recipe(cfg) -> DemoCorpusRecipe:
    return DemoCorpusRecipe.from_any(OmegaConf.to_container(cfg.data.corpus, resolve=True))


def test_demo_long_asr_reuses_the_demo_long_corpus(tmp_path):
    long = compose_run_config(["experiment=demo_long"], tmp_path)
    asr = compose_run_config(["experiment=demo_long_asr"], tmp_path)
    assert _recipe(long).hash() == _recipe(asr).hash() == DEMO_LONG_CORPUS_HASH  # no 12-minute rebuild


def test_demo_long_asr_is_asr_heavy_and_keeps_the_curve_and_baseline(tmp_path):
    long = compose_run_config(["experiment=demo_long"], tmp_path)
    asr = compose_run_config(["experiment=demo_long_asr"], tmp_path)
    w, w_long = asr.data.task_weights, long.data.task_weights
    share = lambda weights: weights.asr / (weights.asr + weights.tts + weights.text)  # noqa: E731
    assert share(w) > share(w_long) and w.tts > 0 and w.text > 0  # TTS and text metrics still measured
    assert asr.callbacks.asr_wer_curve.mismatched and asr.test_asr_mismatched
    assert asr.task_name == "demo_long_asr" and asr.trainer.max_steps >= long.trainer.max_steps
