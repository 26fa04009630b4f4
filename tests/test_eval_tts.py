"""Offline TTS path: the mean-mel vocoder (against hand-computed statistics), pocketsphinx on flite speech,
text -> units -> waveform -> pocketsphinx -> WER through the entry point (mode=eval, and after a training run's
test with eval_after_test)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jiwer
import pytest
import torch
import torchaudio

from most_lightning.audio.mean_mel_vocoder import MeanMelConfig, MeanMelVocoder, UnitVocabularyMismatchError
from eval_fixtures import run_eval_cli, tiny_run  # noqa: F401
from most_lightning.metrics.normalize import TextNormalizer

needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="needs the flite program (setup.sh)")


def test_mean_mel_vocoder_statistics_match_hand_computation(tmp_path):
    torch.manual_seed(0)
    cfg = MeanMelConfig(n_units=3)
    wave = torch.randn(16000) * 0.1
    units = [0, 0, 2, 2, 2, 0, 1, 1, 1, 1] + [1] * 15  # 25 frames = 1 s
    vocoder = MeanMelVocoder.fit([(wave, units)], n_units=3, config=cfg)
    mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=1024, win_length=400, hop_length=160, n_mels=80,
                                               power=1.0, center=True)
    frames = torch.log(mel(wave).T + 1e-5)[:100].reshape(25, 4, 80)
    u = torch.tensor(units)
    for unit in range(3):
        assert torch.allclose(vocoder.mean_log_mel[unit], frames[u == unit].mean(0), atol=1e-4)
    # runs: unit 0 -> 2 and 1 (mean 1.5), unit 2 -> 3, unit 1 -> 19
    assert vocoder.mean_duration.tolist() == pytest.approx([1.5, 19.0, 3.0])
    out = vocoder([0, 2, 1], deduplicated=True)  # 2 + 3 + 19 unit frames of 640 samples
    assert out.shape[0] == pytest.approx(24 * 640, abs=640) and out.abs().max() <= 0.9 + 1e-6
    torch.rand(3)  # the global RNG state must not change the audio
    assert torch.equal(vocoder([0, 2, 1], deduplicated=True), out)
    vocoder.save(tmp_path / "v")
    again = MeanMelVocoder.load(tmp_path / "v")
    assert torch.equal(again.mean_log_mel, vocoder.mean_log_mel) and again.config == vocoder.config
    with pytest.raises(UnitVocabularyMismatchError, match="knows 3 units"):
        vocoder([0, 5])


def test_vocoder_of_another_unit_vocabulary_is_refused():
    from most_lightning.audio.mean_mel_vocoder import check_unit_vocabulary

    with pytest.raises(UnitVocabularyMismatchError, match="built for 100 units but the model's tokenizer has 500"):
        check_unit_vocabulary(100, 500)


@needs_flite
def test_pocketsphinx_transcribes_flite_speech(tmp_path):
    from most_lightning.audio.io import read_audio
    from most_lightning.eval.recognizers import build_recognizer

    text = "The quick brown fox jumps over the lazy dog"
    subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", str(tmp_path / "a.wav")], check=True)
    wave, rate = read_audio(str(tmp_path / "a.wav"))
    rec = build_recognizer({"kind": "pocketsphinx"})
    hyp, nothing = rec.transcribe([wave, torch.zeros(0)])  # an empty generation must not crash it
    norm = TextNormalizer()
    assert jiwer.wer(norm(text), norm(hyp)) <= 0.25, hyp  # flite speech is intelligible to it
    assert nothing == ""


def test_unknown_recognizer_kind_is_named():
    from most_lightning.eval.recognizers import build_recognizer

    with pytest.raises(ValueError, match="known kinds"):
        build_recognizer({"kind": "whisper"})


# a unit_mel vocoder small enough to train in seconds (the real one: conf/eval/tasks/tts.yaml)
SMALL_UNIT_MEL = [f"eval.tasks.tts.vocoders.unit_mel.{k}={v}"
                  for k, v in {"fit_utterances": 4, "steps": 3, "channels": 16, "layers": 1}.items()]


def _logs(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


@needs_flite
@pytest.mark.slow
def test_tts_suite_through_the_entry_point(tiny_run, tmp_path):
    """A 5-step tiny model's units are not intelligible (not required); the report must hold the judge's
    ceiling on the original flite audio, each vocoder's resynthesis WER and the model's TTS WER, each equal to
    jiwer's WER on what the recogniser said. The unit_mel vocoder is trained once per corpus and settings."""
    mean_mel = "+eval.tasks.tts.vocoders.mean_mel={kind: mean_mel, fit_utterances: 20}"
    _, data_dir = tiny_run
    for cache in data_dir.glob("demo/*/vocoders"):  # another test of the session may have trained this one
        shutil.rmtree(cache)
    args = ("eval=tts", "eval.tasks.tts.limit=3", "eval.tasks.tts.max_new_tokens=40", *SMALL_UNIT_MEL)
    out, result = run_eval_cli(tiny_run, tmp_path / "eval", *args, mean_mel)
    report = json.loads((out / "eval_report.json").read_text())
    tts = report["tasks"]["tts"]
    m = tts["metrics"]
    assert m["n_utterances"] == 3 and m["n_skipped_samples"] == 0
    norm = TextNormalizer()
    for name in ("ground_truth", "unit_mel", "resynth_unit_mel", "mean_mel", "resynth_mean_mel"):
        ex = tts["examples"][name]
        assert len(ex) == 3
        expected = jiwer.wer([norm(e["reference"]) for e in ex], [norm(e["hypothesis"]) for e in ex])
        key = "wer_ground_truth" if name == "ground_truth" else f"wer_{name}"
        assert m[key] == pytest.approx(expected), name
    assert m["wer_ground_truth"] < 0.6  # flite speech is intelligible to pocketsphinx
    # a 5-step model rarely emits end-of-audio within 40 tokens: those sequences are counted, never vocoded
    assert 0 <= m["n_did_not_stop"] <= 3 and 0.0 <= m["stop_rate"] <= 1.0
    assert m["n_empty_unit_outputs"] >= m["n_did_not_stop"]
    assert (out / "vocoders" / "mean_mel" / "mean_mel_vocoder.json").is_file()
    assert list((out / "tts_audio").glob("*.resynth.flac"))
    # the unit_mel vocoder went into the corpus's cache with its settings; a second run loads it
    cached = list(data_dir.glob("demo/*/vocoders/unit_mel-*/settings.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["steps"] == 3
    assert "training it once" in _logs(result)
    _, again = run_eval_cli(tiny_run, tmp_path / "eval2", *args)
    assert "training it once" not in _logs(again) and str(cached[0].parent) in _logs(again)


@needs_flite
@pytest.mark.slow
def test_eval_after_test_puts_the_tts_figures_into_the_run(tiny_run, tmp_path):
    """run.py eval_after_test=[tts]: after fit + test, the TTS eval of the tested weights lands in metrics.json
    (the same numbers as its eval_report.json) and in the end-of-run summary."""
    from conftest import FAST_OVERRIDES, REPO_ROOT

    _, data_dir = tiny_run
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "run.py", *FAST_OVERRIDES, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
           "test_asr_mismatched=false", "eval=tts", "eval_after_test=[tts]", "eval.progress=false",
           "eval.tasks.tts.limit=2", "eval.tasks.tts.max_new_tokens=30", "eval.tasks.tts.resynthesis=false",
           *SMALL_UNIT_MEL]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report = json.loads((run_dir / "eval_report.json").read_text())["tasks"]["tts"]["metrics"]
    for name in ("wer_unit_mel", "wer_ground_truth", "stop_rate", "n_did_not_stop"):
        assert metrics[f"eval/tts/{name}"] == pytest.approx(report[name]), name
    assert "test/asr_wer" in metrics  # the test stage ran before
    assert "TTS WER (unit_mel vocoder)" in result.stdout and "TTS stop rate" in result.stdout


def test_eval_after_test_names_only_tasks_of_the_suite(tmp_path):
    """A task the eval suite does not enable, or a bare string, is refused before any work."""
    from conftest import compose_run_config
    from run import check_settings

    with pytest.raises(ValueError, match=r"\['tts'\] are not enabled in the eval suite 'default'"):
        check_settings(compose_run_config(["eval_after_test=[tts]"], tmp_path))
    with pytest.raises(ValueError, match="must be a list of eval task names"):
        check_settings(compose_run_config(["eval_after_test=tts"], tmp_path))
    check_settings(compose_run_config(["eval=tts", "eval_after_test=[tts]"], tmp_path))


def test_hf_ctc_recognizer_loads_a_local_save_pretrained_directory(tmp_path):
    """A small random Wav2Vec2ForCTC + processor written with save_pretrained: the recogniser must give the
    same text as decoding the in-memory model's argmax with the same tokenizer."""
    import json as _json

    from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC,
                              Wav2Vec2Processor)

    from most_lightning.eval.recognizers import build_recognizer

    vocab = {"<pad>": 0, "|": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    (tmp_path / "vocab.json").write_text(_json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=False)
    processor = Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
    torch.manual_seed(0)
    config = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, pad_token_id=0,
                            do_stable_layer_norm=False, feat_extract_norm="group")
    model = Wav2Vec2ForCTC(config).eval()
    model.save_pretrained(tmp_path / "ctc")
    processor.save_pretrained(tmp_path / "ctc")
    waves = [torch.randn(8000) * 0.1, torch.randn(12000) * 0.1]
    rec = build_recognizer({"kind": "hf_ctc", "model_dir": str(tmp_path / "ctc"), "batch_size": 1})
    got = rec.transcribe(waves)
    with torch.no_grad():
        expected = []
        for w in waves:
            x = processor(w.numpy(), sampling_rate=16000, return_tensors="pt").input_values
            expected.append(tokenizer.decode(model(x).logits.argmax(-1)[0]).strip())
    assert got == expected
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        build_recognizer({"kind": "hf_ctc", "model_dir": str(tmp_path / "missing")})


def test_stop_metrics_count_did_not_stop_and_the_length_window():
    from most_lightning.eval.tts import GeneratedSpeech, stop_metrics

    gen = [GeneratedSpeech([1] * 10, True),   # reference 10: stops in the window
           GeneratedSpeech([1] * 13, True),   # reference 10: +30% is still inside
           GeneratedSpeech([1] * 14, True),   # reference 10: +40%, stops but too long
           GeneratedSpeech([1] * 40, False)]  # ran to max_new_tokens: did not stop
    m = stop_metrics(gen, [10, 10, 10, 20])
    assert m["n_did_not_stop"] == 1 and m["stop_rate"] == pytest.approx(2 / 4)
    assert m["mean_units_generated"] == pytest.approx((10 + 13 + 14 + 40) / 4)
    assert m["mean_units_reference"] == pytest.approx(12.5)
    with pytest.raises(ValueError, match="4 generated sequences but 3 reference lengths"):
        stop_metrics(gen, [10, 10, 10])


def test_a_tts_prompt_longer_than_the_context_is_refused_with_the_lengths():
    from types import SimpleNamespace

    from most_lightning.data.tasks import TaskFormatter
    from most_lightning.eval.tts import PromptTooLongError, tts_prompts
    from most_lightning.text.tokenizer import MoSTTokenizer

    tok = MoSTTokenizer.train(["the cat sat on the mat", "a dog ran far away"], vocab_size=300, n_units=8)
    text = "the cat sat on the mat " * 4
    n = len(TaskFormatter(tok).tts_prompt_ids(text))
    ctx = SimpleNamespace(tokenizer=tok, model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=n)))
    with pytest.raises(PromptTooLongError, match=f"has {n} tokens but the model's context .* is {n}"):
        tts_prompts(ctx, [text], max_new_tokens=10)
    ctx.model.config.max_position_embeddings = n + 1
    assert len(tts_prompts(ctx, [text], max_new_tokens=10)[0]) == n
