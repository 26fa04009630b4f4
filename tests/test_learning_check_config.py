"""The learning-check experiments: demo_long_asr = demo_long's sentences and voices with the phone-classifier front
end, a near-character tokenizer, plain attention and an ASR-heavy mix."""

from __future__ import annotations

from omegaconf import OmegaConf

from conftest import compose_run_config
from most_lightning.data import DemoCorpusRecipe

DEMO_LONG_CORPUS_HASH = "5c67e76b9a08"  # the 20k-utterance corpora the measurements in docs/learning_check.md used
DEMO_LONG_ASR_CORPUS_HASH = "3d05aea261e6"


def _recipe(cfg) -> DemoCorpusRecipe:
    return DemoCorpusRecipe.from_any(OmegaConf.to_container(cfg.data.corpus, resolve=True))


def test_demo_long_asr_changes_only_the_front_end_and_vocabulary_of_the_corpus(tmp_path):
    long = compose_run_config(["experiment=demo_long"], tmp_path)
    asr = compose_run_config(["experiment=demo_long_asr"], tmp_path)
    assert _recipe(long).hash() == DEMO_LONG_CORPUS_HASH and _recipe(asr).hash() == DEMO_LONG_ASR_CORPUS_HASH
    a, b = _recipe(long).canonical(), _recipe(asr).canonical()
    changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert changed == {"unit_model", "phone_classifier", "n_units", "mfcc", "text_vocab_size"}  # same sentences
    assert b["unit_model"] == "phone_classifier" and b["mfcc"]["cmvn"] == "utterance"
    assert asr.model.attention == "gqa" and long.model.attention == "mla"


def test_demo_long_asr_is_asr_heavy_and_keeps_the_curve_and_baseline(tmp_path):
    long = compose_run_config(["experiment=demo_long"], tmp_path)
    asr = compose_run_config(["experiment=demo_long_asr"], tmp_path)
    w, w_long = asr.data.task_weights, long.data.task_weights
    share = lambda weights: weights.asr / (weights.asr + weights.tts + weights.text)  # noqa: E731
    assert share(w) > share(w_long) and w.tts > 0 and w.text > 0  # TTS and text metrics still measured
    assert asr.callbacks.asr_wer_curve.mismatched and asr.test_asr_mismatched
    assert asr.task_name == "demo_long_asr" and asr.trainer.max_steps >= long.trainer.max_steps
