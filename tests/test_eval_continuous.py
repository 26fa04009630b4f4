"""`mode=eval` on a MoST-C model (audio=continuous): beam search on spliced prompt embeddings, the audio config
check of the checkpoint loader, and the entry point on a tiny continuous model trained through run.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST_OVERRIDES, REPO_ROOT
from test_eval_asr import _tiny_model

CONTINUOUS = {"mode": "continuous", "encoder": {"kind": "hubert", "checkpoint": None, "format": "auto",
                                                "layer": "last", "arch": "tiny", "seed": 0},
              "quantizer": None, "markers": "drop"}


def _spliced_prompts(model, seed: int = 1):
    """Two left-padded prompts whose middle positions are 'audio frames': random vectors in place of the
    token embeddings (what ContinuousAudioInput.splice produces)."""
    prompts = [[1, 2, 0, 0, 0, 3, 4], [5, 0, 0, 6]]
    width = max(map(len, prompts))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), True
    frames = (ids == 0) & mask
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids).clone()
        embeds[frames] = torch.randn(int(frames.sum()), embeds.shape[-1], generator=gen)
    return ids, frames.long(), mask, embeds


def test_beam_width_one_equals_greedy_on_continuous_prompts():
    from most_lightning.model.generation import beam_generate, greedy_generate

    model = _tiny_model(vocab=12)
    ids, modality, mask, embeds = _spliced_prompts(model)
    greedy = greedy_generate(model, ids, modality, mask, 6, eos_id=11, inputs_embeds=embeds)
    beam1 = beam_generate(model, ids, modality, mask, 6, eos_id=11, beam_size=1, inputs_embeds=embeds)
    n = min(greedy.shape[1], beam1.shape[1])
    assert n > 0 and torch.equal(greedy[:, :n], beam1[:, :n])
    # the embeddings are really what is decoded: the same ids without them give another output
    plain = beam_generate(model, ids, modality, mask, 6, eos_id=11, beam_size=1)
    m = min(plain.shape[1], beam1.shape[1])
    assert not torch.equal(plain[:, :m], beam1[:, :m])


def test_beam_on_continuous_prompts_batched_rows_match_single_prompts():
    from most_lightning.model.generation import beam_generate

    model = _tiny_model(vocab=12)
    ids, modality, mask, embeds = _spliced_prompts(model, seed=2)
    batched = beam_generate(model, ids, modality, mask, 6, eos_id=11, beam_size=3, inputs_embeds=embeds)
    for r in range(2):
        keep = mask[r]
        alone = beam_generate(model, ids[r:r + 1, keep], modality[r:r + 1, keep], None, 6, eos_id=11, beam_size=3,
                              inputs_embeds=embeds[r:r + 1, keep])
        assert torch.equal(batched[r, : alone.shape[1]], alone[0])


def test_audio_mode_is_part_of_the_config_check():
    from most_lightning.eval.checkpoint import config_differences

    units = {"mode": "units", "encoder": None}
    assert config_differences({"audio": CONTINUOUS}, {}, {}, 10, units) == [("audio.mode", "continuous", "units")]
    assert config_differences({"audio": None}, {}, {}, 10, CONTINUOUS) == [("audio.mode", "units", "continuous")]
    assert config_differences({"audio": CONTINUOUS}, {}, {}, 10, CONTINUOUS) == []
    other = {**CONTINUOUS, "encoder": {**CONTINUOUS["encoder"], "arch": "small"}, "markers": "keep"}
    assert config_differences({"audio": CONTINUOUS}, {}, {}, 10, other) == [
        ("audio.encoder.arch", "tiny", "small"), ("audio.markers", "drop", "keep")]


def test_continuous_eval_of_exported_decoder_weights_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from most_lightning.eval.checkpoint import CheckpointMismatchError, load_for_eval

    model = _tiny_model(vocab=12)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    model_cfg = dict(preset="tiny", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                     moe_intermediate_size=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    _, audio_input, _ = load_for_eval(str(path), model_cfg, {"name": "modality_aware"}, 12)
    assert audio_input is None
    with pytest.raises(CheckpointMismatchError, match="no audio_input.* weights"):
        load_for_eval(str(path), model_cfg, {"name": "modality_aware"}, 12, CONTINUOUS)


# ---------------------------------------------------------------------------------------------- entry point
def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def continuous_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, data dir) of a tiny audio=continuous model trained and tested through run.py."""
    base = tmp_path_factory.mktemp("continuous_train")
    data_dir = tmp_path_factory.getbasetemp() / "most_data_corpus"
    run_dir = base / "run"
    result = _run([*FAST_OVERRIDES, "audio=continuous", f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
                   f"paths.log_dir={base / 'logs'}", "test_asr_mismatched=false"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, data_dir


def _eval(continuous_run, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    run_dir, data_dir = continuous_run
    return _run(["mode=eval", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", *FAST_OVERRIDES,
                 f"paths.data_dir={data_dir}", f"hydra.run.dir={out}", "eval.progress=false", *overrides])


@pytest.mark.slow
def test_continuous_eval_greedy_wer_equals_the_lightning_test_loop(continuous_run, tmp_path):
    """mode=eval (eval/asr.py + context splice) vs MoSTLitModule.transcribe during training, same weights."""
    run_dir, _ = continuous_run
    trained = json.loads((run_dir / "metrics.json").read_text())
    out = tmp_path / "eval"
    result = _eval(continuous_run, out, "audio=continuous", "eval=asr", "eval.tasks.asr.max_new_tokens=16",
                   "eval.tasks.asr.beam_size=3")
    assert result.returncode == 0, result.stderr[-4000:]
    task = json.loads((out / "eval_report.json").read_text())["tasks"]["asr"]
    asr = task["metrics"]
    assert task["settings"]["speech_input"] == "continuous"
    assert asr["n_utterances"] == trained["test/asr_n_utterances"] and asr["n_skipped_samples"] == 0
    assert asr["wer_greedy"] == pytest.approx(trained["test/asr_wer"], abs=1e-6)
    assert asr["cer_greedy"] == pytest.approx(trained["test/asr_cer"], abs=1e-6)
    # the very same hypotheses, utterance by utterance
    lit = {e["key"]: e["hypothesis"] for e in json.loads((run_dir / "asr_examples.json").read_text())["asr"]}
    ours = {e["key"]: e["hypothesis"] for e in task["examples"]["greedy"]}
    assert ours and all(lit[k] == h for k, h in ours.items() if k in lit)
    assert set(ours) & set(lit)
    assert asr["wer_beam"] >= 0 and asr["cer_beam"] >= 0


@pytest.mark.slow
def test_continuous_checkpoint_with_a_units_eval_config_is_a_config_mismatch(continuous_run, tmp_path):
    result = _eval(continuous_run, tmp_path / "eval", "eval=asr", "audio=units_mfcc")
    assert result.returncode != 0
    assert "trained with another config" in result.stderr
    assert "audio.mode: checkpoint 'continuous', eval config 'units'" in result.stderr
    assert "audio=continuous" in result.stderr


@pytest.mark.slow
def test_unit_input_tasks_are_not_applicable_to_a_continuous_model(continuous_run, tmp_path):
    out = tmp_path / "eval"
    result = _eval(continuous_run, out, "audio=continuous", "eval=full", "eval.tasks.asr=null",
                   "eval.tasks.text_ppl=null", "eval.tasks.tts.limit=2", "eval.tasks.tts.max_new_tokens=8",
                   "eval.tasks.tts.resynthesis=false", "eval.fail_fast=true",
                   *[f"eval.tasks.tts.vocoders.unit_mel.{k}={v}" for k, v in
                     {"fit_utterances": 4, "steps": 3, "channels": 16, "layers": 1}.items()])
    assert result.returncode == 0, result.stderr[-4000:]
    tasks = json.loads((out / "eval_report.json").read_text())["tasks"]
    assert "continuous features" in tasks["minimal_pairs"]["not_applicable"]
    assert tasks["tts"]["metrics"]["n_utterances"] == 2  # speech out stays units: TTS runs
    assert "| minimal_pairs | not applicable |" in (out / "eval_report.md").read_text()


def test_eval_decoding_of_a_continuous_checkpoint_equals_the_module_transcribe(tmp_path, toy_tokenizer):
    """A MoSTLitModule (audio=continuous) saved as a Lightning checkpoint, loaded by the eval loader: the eval's
    greedy ids equal MoSTLitModule.transcribe's on the same prompts, and beam width 1 equals greedy."""
    from most_lightning.data.collate import collate_asr_generation
    from most_lightning.data.continuous import ContinuousASRFormatter
    from most_lightning.data.tasks import TaskFormatter
    from most_lightning.eval.asr import generate_examples
    from most_lightning.eval.checkpoint import load_for_eval
    from most_lightning.eval.context import EvalContext
    from most_lightning.text.tokenizer import decode_text_rows
    from test_continuous_audio import continuous_module, waves

    tok = toy_tokenizer
    torch.manual_seed(0)  # weights under which the audio changes the transcripts, whatever ran before
    module, _ = continuous_module(tmp_path, tok.vocab_size, tokenizer=tok)
    with torch.no_grad():  # audio that matters and sharp distributions, so the comparison is not vacuous
        module.audio_input.proj.weight.mul_(50)
        module.model.lm_head.weight.mul_(30)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 3}, path)
    hp = module.hparams
    model, audio_input, info = load_for_eval(str(path), hp["model"], hp["router"], tok.vocab_size, hp["audio"])
    assert info["audio_mode"] == "continuous"
    ctx = EvalContext(model=model, tokenizer=tok, audio_input=audio_input)
    fmt = ContinuousASRFormatter(TaskFormatter(tok), audio_input.encoder.n_frames, "drop")
    examples = [fmt.asr_generation(w, "abc", f"k{i}") for i, w in enumerate(waves(16000, 6000, 11000, seed=3))]
    greedy = generate_examples(ctx, examples, 8, "greedy")
    beam1 = generate_examples(ctx, examples, 8, "beam", beam_size=1)
    n = min(greedy.shape[1], beam1.shape[1])
    assert n > 0 and torch.equal(greedy[:, :n], beam1[:, :n])
    batch = collate_asr_generation(examples, tok.pad_id, tok.modality_of)
    module.evaluation_settings["asr_max_new_tokens"] = 8
    assert decode_text_rows(tok, greedy) == module.transcribe(batch)
    hyps = decode_text_rows(tok, greedy)
    assert any(hyps) and len(set(hyps)) > 1, hyps  # the audio changes the transcript
