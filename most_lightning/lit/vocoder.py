"""Train the unit HiFi-GAN generator (+ duration predictor) on prepared shards: `python run.py experiment=vocoder`.

Losses: L1 between log-mel spectrograms (HiFi-GAN's reconstruction term) + a multi-resolution STFT magnitude
loss on the waveform, and MSE of the duration predictor on log(1 + run length) of the deduplicated units.
The adversarial part of HiFi-GAN (multi-period / multi-scale discriminators) is NOT implemented: this trains
the generator with its reconstruction losses only, which gives intelligible but buzzy speech; a released
SpiritLM/fairseq checkpoint loads with most_lightning.audio.hifigan.load_unit_hifigan.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
import torchaudio
from lightning import LightningModule
from torch.utils.data import DataLoader, IterableDataset

from most_lightning.audio.hifigan import CodeGenerator, UnitHiFiGANConfig
from most_lightning.audio.hifigan_discriminators import (MultiPeriodDiscriminator, MultiScaleDiscriminator,
                                                         discriminator_loss, feature_matching_loss,
                                                         generator_adversarial_loss)
from most_lightning.audio.io import read_audio
from most_lightning.data.samples import AUDIO_MEMBER, BadSampleError, BadSamplePolicy, decode_speech_sample, iter_shard

log = logging.getLogger(__name__)


def unit_runs(units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deduplicated units and their run lengths: [5, 5, 7] -> ([5, 7], [2, 1])."""
    change = torch.ones_like(units, dtype=torch.bool)
    change[1:] = units[1:] != units[:-1]
    starts = torch.nonzero(change).flatten()
    return units[starts], torch.diff(torch.cat((starts, torch.tensor([len(units)]))))


class UnitWaveSegments(IterableDataset):
    """Endless random segments (segment_units unit frames + the matching audio) of a speech split's shards."""

    def __init__(self, shards: list[str], n_units: int, segment_units: int = 32, hop_length: int = 640,
                 seed: int = 0, on_bad_sample: str = "skip", max_utterances: int | None = None):
        self.shards, self.n_units, self.segment, self.hop = list(shards), n_units, segment_units, hop_length
        self.seed, self.on_bad_sample, self.max_utterances = seed, on_bad_sample, max_utterances
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _utterances(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._cache is None:  # demo corpora are small: decode once, keep in memory
            policy, out = BadSamplePolicy(self.on_bad_sample), []
            for shard in self.shards:
                for sample in iter_shard(shard, policy):
                    try:
                        rec = decode_speech_sample(sample, self.n_units, dedup=False, verify_audio="full")
                        wave, _ = read_audio(sample[AUDIO_MEMBER], name=rec.key)
                    except BadSampleError as err:
                        policy.handle(err)
                        continue
                    out.append((torch.tensor(rec.units), wave))
                    if self.max_utterances and len(out) >= self.max_utterances:
                        break
            if not out:
                raise RuntimeError(f"no usable utterance in {len(self.shards)} shard(s) ({policy.total} skipped)")
            self._cache = out
        return self._cache

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        utts = self._utterances()
        rng = random.Random(self.seed)
        while True:
            units, wave = utts[rng.randrange(len(utts))]
            n = min(len(units), len(wave) // self.hop)
            start = rng.randrange(max(1, n - self.segment + 1))
            seg = units[start : start + self.segment]
            audio = wave[start * self.hop : (start + len(seg)) * self.hop]
            pad = self.segment - len(seg)
            yield {"units": F.pad(seg, (0, pad), value=int(seg[-1])),
                   "wave": F.pad(audio, (0, self.segment * self.hop - len(audio))),
                   "n_frames": torch.tensor(len(seg))}


DISCRIMINATOR_DEFAULTS = {"periods": [2, 3, 5, 7, 11], "scales": 3, "channel_divisor": 1}


class UnitVocoderLitModule(LightningModule):
    def __init__(self, generator: Mapping[str, Any], lr: float = 2e-4, betas=(0.8, 0.99),
                 mel_weight: float = 1.0, stft_weight: float = 1.0, duration_weight: float = 1.0,
                 adversarial: bool = False, discriminator: Mapping[str, Any] | None = None,
                 discriminator_start_step: int = 0, lr_decay: float = 0.999, lr_decay_interval: int = 800) -> None:
        super().__init__()
        unknown = set(discriminator or {}) - set(DISCRIMINATOR_DEFAULTS)
        if unknown:
            raise ValueError(f"vocoder.discriminator: unknown key(s) {sorted(unknown)}; "
                             f"known: {sorted(DISCRIMINATOR_DEFAULTS)}")
        disc = {**DISCRIMINATOR_DEFAULTS, **(discriminator or {})}
        self.save_hyperparameters({"generator": dict(generator), "lr": lr, "betas": list(betas),
                                   "mel_weight": mel_weight, "stft_weight": stft_weight,
                                   "duration_weight": duration_weight, "adversarial": adversarial,
                                   "discriminator": {k: (list(v) if isinstance(v, (list, tuple)) else v)
                                                     for k, v in disc.items()},
                                   "discriminator_start_step": discriminator_start_step, "lr_decay": lr_decay,
                                   "lr_decay_interval": lr_decay_interval})
        self.cfg = UnitHiFiGANConfig.from_dict(generator)
        self.generator = CodeGenerator(self.cfg)
        self.mel = torchaudio.transforms.MelSpectrogram(self.cfg.sampling_rate, n_fft=1024, win_length=1024,
                                                        hop_length=256, n_mels=80, power=1.0)
        if adversarial:
            self.automatic_optimization = False  # generator and discriminators alternate, as in HiFi-GAN
            self.mpd = MultiPeriodDiscriminator(disc["periods"], int(disc["channel_divisor"]))
            self.msd = MultiScaleDiscriminator(int(disc["scales"]), int(disc["channel_divisor"]))
            # generator steps taken (trainer.global_step counts both optimisers' steps); saved for resuming
            self.register_buffer("adversarial_steps", torch.zeros((), dtype=torch.long))

    def _stft_loss(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        loss = fake.new_zeros(())
        for n_fft, hop in ((512, 128), (1024, 256), (2048, 512)):
            window = torch.hann_window(n_fft, device=fake.device)
            f = torch.stft(fake, n_fft, hop, window=window, return_complex=True).abs()
            r = torch.stft(real, n_fft, hop, window=window, return_complex=True).abs()
            loss = loss + (torch.linalg.norm(r - f) / torch.linalg.norm(r).clamp(min=1e-5)
                           + F.l1_loss(torch.log(f + 1e-5), torch.log(r + 1e-5)))
        return loss / 3

    def generate(self, units: torch.Tensor) -> torch.Tensor:
        spkr = torch.zeros(units.shape[0], dtype=torch.long, device=units.device) if self.cfg.multispkr else None
        return self.generator(units, spkr=spkr)[:, 0]

    def losses(self, batch: Mapping[str, torch.Tensor], fake: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Reconstruction (mel, stft) and duration losses; `fake` [B, T] is the generator's output when known."""
        units, wave = batch["units"], batch["wave"]
        fake = self.generate(units) if fake is None else fake
        out = {"mel": F.l1_loss(torch.log(self.mel(fake) + 1e-5), torch.log(self.mel(wave) + 1e-5)),
               "stft": self._stft_loss(fake, wave)}
        if self.generator.dur_predictor is not None:
            dur_losses = []
            for row, n in zip(units, batch["n_frames"]):
                codes, lengths = unit_runs(row[: int(n)].cpu())
                pred = self.generator.dur_predictor(self.generator.dict(codes.to(units.device))[None])[0]
                dur_losses.append(F.mse_loss(pred, torch.log1p(lengths.float().to(units.device))))
            out["duration"] = torch.stack(dur_losses).mean()
        return out

    def _reconstruction_loss(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        return h.mel_weight * parts["mel"] + h.stft_weight * parts["stft"] + h.duration_weight * parts.get(
            "duration", torch.zeros((), device=self.device))

    def training_step(self, batch, batch_idx):
        if self.hparams.adversarial:
            return self._adversarial_step(batch)
        parts = self.losses(batch)
        loss = self._reconstruction_loss(parts)
        self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()} | {"train/loss": loss.detach()},
                      prog_bar=True, batch_size=batch["units"].shape[0])
        return loss

    def _adversarial_step(self, batch) -> torch.Tensor:
        g_opt, d_opt = self.optimizers()
        real = batch["wave"][:, None]
        fake = self.generate(batch["units"])[:, None]
        logs: dict[str, torch.Tensor] = {}
        adversarial_on = int(self.adversarial_steps) >= self.hparams.discriminator_start_step
        if adversarial_on:  # discriminators: real -> 1, (detached) generated -> 0
            d_loss = sum(discriminator_loss(*disc(real, fake.detach())[:2]) for disc in (self.mpd, self.msd))
            d_opt.zero_grad()
            self.manual_backward(d_loss)
            d_opt.step()
            logs["disc"] = d_loss.detach()
        parts = self.losses(batch, fake=fake[:, 0])
        g_loss = self._reconstruction_loss(parts)
        if adversarial_on:  # generator: fool both discriminators, match their features on real audio
            adv, fm = fake.new_zeros(()), fake.new_zeros(())
            for disc in (self.mpd, self.msd):
                _, fake_scores, real_fmaps, fake_fmaps = disc(real, fake)
                adv = adv + generator_adversarial_loss(fake_scores)
                fm = fm + feature_matching_loss(real_fmaps, fake_fmaps)
            g_loss = g_loss + adv + fm
            logs |= {"gen_adv": adv.detach(), "feature_matching": fm.detach()}
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        self.adversarial_steps += 1
        if int(self.adversarial_steps) % self.hparams.lr_decay_interval == 0:
            for scheduler in self.lr_schedulers():
                scheduler.step()
        logs |= {k: v.detach() for k, v in parts.items()} | {"loss": g_loss.detach()}
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=True, batch_size=real.shape[0])
        return g_loss.detach()

    def configure_optimizers(self):
        h = self.hparams
        g_opt = torch.optim.AdamW(self.generator.parameters(), lr=h.lr, betas=tuple(h.betas))
        if not h.adversarial:
            return g_opt
        d_opt = torch.optim.AdamW([*self.mpd.parameters(), *self.msd.parameters()], lr=h.lr, betas=tuple(h.betas))
        schedulers = [torch.optim.lr_scheduler.ExponentialLR(opt, gamma=h.lr_decay) for opt in (g_opt, d_opt)]
        return [g_opt, d_opt], schedulers


def train_vocoder(cfg) -> dict[str, float]:
    """`python run.py experiment=vocoder`: fit on the data config's train shards, save <run>/vocoder.ckpt
    (load it with load_unit_hifigan or tts vocoders: {kind: unit_hifigan, checkpoint: <run>/vocoder.ckpt})."""
    import hydra
    import lightning as L
    from omegaconf import OmegaConf

    from most_lightning.lit.runtime import scalar_metrics, write_json

    voc = OmegaConf.to_container(cfg.vocoder, resolve=True)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    n_units = datamodule.tokenizer.n_units
    generator = {**voc.get("generator", {}), "num_embeddings": n_units}
    module = UnitVocoderLitModule(generator, **voc.get("optim", {}), adversarial=bool(voc.get("adversarial", False)),
                                  discriminator=voc.get("discriminator"),
                                  discriminator_start_step=int(voc.get("discriminator_start_step", 0)))
    hop = module.cfg.hop_length
    frame_hop = int(round(datamodule.manifest.get("frame_rate", 0) and 16000 / datamodule.manifest["frame_rate"]))
    if frame_hop and frame_hop != hop:
        raise ValueError(f"vocoder.generator.upsample_rates multiply to {hop} samples per unit, but the corpus' "
                         f"units are {frame_hop} samples apart: make their product {frame_hop}")
    dataset = UnitWaveSegments(datamodule.shards("train"), n_units, int(voc.get("segment_units", 32)), hop,
                               seed=int(cfg.get("seed") or 0), on_bad_sample=datamodule.quality.on_bad_sample,
                               max_utterances=voc.get("max_utterances"))
    loader = DataLoader(dataset, batch_size=int(voc.get("batch_size", 8)))
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False, callbacks=[],
                                      val_check_interval=None, check_val_every_n_epoch=None, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    out = Path(cfg.paths.output_dir)
    trainer.save_checkpoint(out / "vocoder.ckpt", weights_only=True)
    metrics = scalar_metrics(trainer.callback_metrics)
    write_json(out / "metrics.json", metrics)
    log.info(f"vocoder saved to {out / 'vocoder.ckpt'}; " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics
