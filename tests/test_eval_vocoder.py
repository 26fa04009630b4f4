"""Unit HiFi-GAN: fairseq/SpiritLM checkpoint layout (written locally with fairseq's weight-norm keys),
unit-vocabulary checks, HiFi-GAN's discriminators and GAN losses (shapes, hand-computed values), and short
training runs (direct, adversarial through a Trainer, and through `run.py experiment=vocoder`)."""

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
from most_lightning.audio.hifigan_discriminators import (MultiPeriodDiscriminator, MultiScaleDiscriminator,
                                                         discriminator_loss, feature_matching_loss,
                                                         generator_adversarial_loss)
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


def test_discriminator_scores_and_feature_maps_have_hifigans_shapes():
    torch.manual_seed(0)
    real, fake = torch.randn(2, 1, 1000), torch.randn(2, 1, 1000)
    mpd = MultiPeriodDiscriminator(channel_divisor=16)
    scores_r, scores_f, fmaps_r, fmaps_f = mpd(real, fake)
    assert len(scores_r) == len(fmaps_f) == 5
    for period, score, fmap in zip((2, 3, 5, 7, 11), scores_r, fmaps_r):
        height = -(-1000 // period)  # reflect-padded to a multiple of the period, folded to [B, 1, T/p, p]
        for _ in range(4):  # four (5, 1) convs with stride 3, padding 2
            height = (height + 4 - 5) // 3 + 1
        assert [f.shape[1] for f in fmap] == [2, 8, 32, 64, 64, 1]  # the paper's 32..1024 widths / 16
        assert all(f.shape[0] == 2 and f.shape[3] == period for f in fmap)
        assert fmap[-1].shape[2] == height and score.shape == (2, height * period)
    msd = MultiScaleDiscriminator(channel_divisor=16)
    scores_r, _, fmaps_r, fmaps_f = msd(real, fake)
    lengths = [1000, 501, 251]  # AvgPool1d(4, 2, padding=2) once, twice
    for length, score, fmap in zip(lengths, scores_r, fmaps_r):
        assert [f.shape[1] for f in fmap] == [8, 8, 16, 32, 64, 64, 64, 1]
        assert fmap[0].shape[2] == length  # stride 1, then strides 2, 2, 4, 4, 1, 1
        assert fmap[-1].shape[2] == score.shape[1] == -(-length // 64)
    assert [[f.shape for f in fm] for fm in fmaps_r] == [[f.shape for f in fm] for fm in fmaps_f]
    # spectral norm on the first scale only, weight norm everywhere else (as HiFi-GAN)
    first = msd.discriminators[0].convs[0].parametrizations.weight[0]
    assert type(first).__name__ == "_SpectralNorm"
    assert type(msd.discriminators[1].convs[0].parametrizations.weight[0]).__name__ == "_WeightNorm"
    full = sum(p.numel() for p in MultiPeriodDiscriminator().parameters())
    assert 41.0e6 < full < 41.2e6  # the paper's MPD (41.1M parameters) at channel_divisor=1


def test_lsgan_and_feature_matching_losses_against_hand_computation():
    real = [torch.tensor([[1.0, 0.5]]), torch.tensor([[0.0]])]
    fake = [torch.tensor([[0.2, -1.0]]), torch.tensor([[2.0]])]
    # discriminator: mean((1 - r)^2) + mean(f^2) per sub-discriminator, summed
    d_expected = ((0.0 + 0.25) / 2 + (0.04 + 1.0) / 2) + (1.0 + 4.0)
    assert discriminator_loss(real, fake).item() == pytest.approx(d_expected)
    # generator: mean((1 - f)^2), summed
    assert generator_adversarial_loss(fake).item() == pytest.approx((0.64 + 4.0) / 2 + 1.0)
    fm_real = [[torch.tensor([1.0, 2.0]), torch.tensor([[0.0, 0.0, 3.0]])], [torch.tensor([5.0])]]
    fm_fake = [[torch.tensor([0.0, 2.0]), torch.tensor([[1.0, 1.0, 0.0]])], [torch.tensor([4.0])]]
    fm_fake_leaf = [[t.clone().requires_grad_() for t in fm] for fm in fm_fake]
    fm_real_leaf = [[t.clone().requires_grad_() for t in fm] for fm in fm_real]
    loss = feature_matching_loss(fm_real_leaf, fm_fake_leaf)
    assert loss.item() == pytest.approx(2 * (0.5 + 5.0 / 3 + 1.0))
    loss.backward()
    assert fm_fake_leaf[0][0].grad is not None and fm_real_leaf[0][0].grad is None  # real features are targets


def _parameters(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
@pytest.mark.parametrize("start_step", [0, 10])
def test_adversarial_training_steps_both_optimisers_after_the_warm_up(start_step, tmp_path):
    import lightning as L

    from most_lightning.lit.vocoder import UnitVocoderLitModule

    torch.manual_seed(0)
    module = UnitVocoderLitModule(SMALL, adversarial=True, discriminator={"channel_divisor": 16},
                                  discriminator_start_step=start_step, lr_decay=0.5, lr_decay_interval=2)
    t = torch.arange(128 * 16) / 16000
    sample = {"units": torch.tensor([1, 1, 2, 2, 3, 3, 3, 4] * 16),
              "wave": 0.3 * torch.sin(2 * torch.pi * 440 * t), "n_frames": torch.tensor(128)}
    before_g, before_mpd, before_msd = (_parameters(m) for m in (module.generator, module.mpd, module.msd))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([sample, sample], batch_size=1))
    assert _changed(before_g, module.generator)
    d_on = start_step == 0
    assert _changed(before_mpd, module.mpd) == d_on and _changed(before_msd, module.msd) == d_on
    assert int(module.adversarial_steps) == 2
    assert trainer.global_step == (4 if d_on else 2)  # Lightning counts both optimisers' steps
    metrics = trainer.callback_metrics
    assert ("train/disc" in metrics and "train/gen_adv" in metrics and "train/feature_matching" in metrics) == d_on
    g_opt, d_opt = trainer.optimizers
    assert g_opt.param_groups[0]["betas"] == (0.8, 0.99)
    assert g_opt.param_groups[0]["lr"] == d_opt.param_groups[0]["lr"] == pytest.approx(2e-4 * 0.5)  # one decay


@pytest.mark.slow
@pytest.mark.parametrize("adversarial", [True, False])
def test_experiment_vocoder_trains_and_its_checkpoint_loads(tmp_path, shared_data_dir, adversarial):
    out = tmp_path / "voc_run"
    cmd = [sys.executable, "run.py", "experiment=vocoder", *FAST_OVERRIDES, f"paths.data_dir={shared_data_dir}",
           f"hydra.run.dir={out}", "trainer.max_steps=3", "vocoder.batch_size=2", "vocoder.segment_units=8",
           "vocoder.generator.upsample_initial_channel=32", "vocoder.generator.embedding_dim=32",
           "vocoder.generator.dur_predictor_params.encoder_embed_dim=32",
           f"vocoder.adversarial={str(adversarial).lower()}", "vocoder.discriminator.channel_divisor=16"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(v is not None for v in (metrics["train/mel"], metrics["train/duration"]))
    if adversarial:
        assert all(metrics[k] > 0 for k in ("train/disc", "train/gen_adv", "train/feature_matching"))
    ckpt = torch.load(out / "vocoder.ckpt", map_location="cpu", weights_only=True)
    assert any(k.startswith("mpd.") for k in ckpt["state_dict"]) == adversarial  # discriminators saved too
    assert "optimizer_states" not in ckpt
    vocoder = load_unit_hifigan(out / "vocoder.ckpt")  # reads the generator only
    assert vocoder.n_units == 32  # the tiny corpus' unit vocabulary
    assert vocoder([1, 2, 2, 3], deduplicated=False).shape[0] == 4 * 640
