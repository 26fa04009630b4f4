"""Unit HiFi-GAN: fairseq/SpiritLM checkpoint layout (written locally with fairseq's weight-norm keys),
unit-vocabulary checks, and short training runs (direct and through `run.py experiment=vocoder`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST_OVERRIDES, REPO_ROOT
from most_lightning.audio.hifigan import CodeGenerator, UnitHiFiGANConfig, load_unit_hifigan
from most_lightning.audio.mean_mel_vocoder import UnitVocabularyMismatchError

SMALL = dict(num_embeddings=20, embedding_dim=16, upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8],
             upsample_initial_channel=32, resblock="1", resblock_kernel_sizes=[3, 5],
             resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
             dur_predictor_params={"encoder_embed_dim": 16, "var_pred_hidden_dim": 16, "var_pred_kernel_size": 3,
                                   "var_pred_dropout": 0.5})


def _write_fairseq_checkpoint(directory: Path, config: dict, seed: int = 0) -> CodeGenerator:
    torch.manual_seed(seed)
    reference = CodeGenerator(UnitHiFiGANConfig.from_dict(config), legacy_weight_norm=True).eval()
    directory.mkdir(parents=True)
    torch.save({"generator": reference.state_dict()}, directory / "generator.pt")
    (directory / "config.json").write_text(json.dumps(config))
    return reference


@pytest.mark.parametrize("speakers", [False, True])
def test_fairseq_layout_checkpoint_loads_and_synthesises_identically(tmp_path, speakers):
    config = {**SMALL, "multispkr": speakers, "num_speakers": 3}
    reference = _write_fairseq_checkpoint(tmp_path / "voc", config)
    keys = torch.load(tmp_path / "voc" / "generator.pt", weights_only=True)["generator"]
    assert "conv_pre.weight_g" in keys and "dur_predictor.conv1.0.weight" in keys  # fairseq's names
    vocoder = load_unit_hifigan(tmp_path / "voc")
    assert vocoder.n_units == 20
    units = torch.tensor([[3, 7, 7, 1, 19]])
    spkr = torch.tensor([2]) if speakers else None
    with torch.no_grad():
        expected = reference(units, spkr=spkr)[0, 0]
        assert torch.allclose(vocoder(units[0], deduplicated=False, speaker=2), expected, atol=1e-5)
        # deduplicated input goes through the duration predictor, as fairseq: round(exp(pred) - 1) >= 1 frames
        durations = reference.durations(torch.tensor([[3, 7, 1]]))
        expanded = torch.tensor([[3, 7, 1]]).repeat_interleave(durations.view(-1), dim=1)
        assert torch.allclose(vocoder([3, 7, 1], deduplicated=True, speaker=2),
                              reference(expanded, spkr=spkr)[0, 0], atol=1e-5)
    assert expected.shape[0] == 5 * 16 and expected.abs().max() <= 1


def test_unit_vocabulary_mismatch_is_a_clear_error(tmp_path, toy_tokenizer):
    from most_lightning.eval.context import EvalContext
    from most_lightning.eval.tts import build_vocoder

    _write_fairseq_checkpoint(tmp_path / "voc", SMALL)  # 20 units; the toy tokenizer has 10
    ctx = EvalContext(model=None, tokenizer=toy_tokenizer, output_dir=tmp_path)
    with pytest.raises(UnitVocabularyMismatchError, match="built for 20 units but the model's tokenizer has 10"):
        build_vocoder(ctx, "hifigan", {"kind": "unit_hifigan", "checkpoint": str(tmp_path / "voc")})
    with pytest.raises(UnitVocabularyMismatchError, match="knows 20 units"):
        load_unit_hifigan(tmp_path / "voc")([25])
    with pytest.raises(FileNotFoundError, match="config.json"):
        (tmp_path / "voc" / "config.json").unlink()
        load_unit_hifigan(tmp_path / "voc" / "generator.pt")


def test_a_few_steps_on_one_batch_reduce_the_reconstruction_loss():
    from most_lightning.lit.vocoder import UnitVocoderLitModule, unit_runs

    assert [t.tolist() for t in unit_runs(torch.tensor([5, 5, 7, 5]))] == [[5, 7, 5], [2, 1, 1]]
    torch.manual_seed(0)
    module = UnitVocoderLitModule(SMALL, lr=2e-3)
    t = torch.arange(128 * 16) / 16000  # 128 unit frames of 16 samples (the longest STFT needs 2048)
    batch = {"units": torch.tensor([[1, 1, 2, 2, 3, 3, 3, 4] * 16]),
             "wave": (0.3 * torch.sin(2 * torch.pi * 440 * t))[None], "n_frames": torch.tensor([128])}
    opt = module.configure_optimizers()
    first = None
    for _ in range(15):
        parts = module.losses(batch)
        loss = parts["mel"] + parts["stft"] + parts["duration"]
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.8 * first


@pytest.mark.slow
def test_experiment_vocoder_trains_and_its_checkpoint_loads(tmp_path, shared_data_dir):
    out = tmp_path / "voc_run"
    cmd = [sys.executable, "run.py", "experiment=vocoder", *FAST_OVERRIDES, f"paths.data_dir={shared_data_dir}",
           f"hydra.run.dir={out}", "trainer.max_steps=3", "vocoder.batch_size=2", "vocoder.segment_units=8",
           "vocoder.generator.upsample_initial_channel=32", "vocoder.generator.embedding_dim=32",
           "vocoder.generator.dur_predictor_params.encoder_embed_dim=32"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(v is not None for v in (metrics["train/mel"], metrics["train/duration"]))
    vocoder = load_unit_hifigan(out / "vocoder.ckpt")
    assert vocoder.n_units == 32  # the tiny corpus' unit vocabulary
    assert vocoder([1, 2, 2, 3], deduplicated=False).shape[0] == 4 * 640
