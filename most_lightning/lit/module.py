"""MoSTLitModule: trains and evaluates a MoSTForCausalLM on mixed ASR / TTS / text-LM batches.

Logged names (split = train | val | test):
  train/loss              LM loss only (cross entropy over response tokens); the optimised loss is this + aux
  train/aux_loss, train/aux/<name>   router losses (already weighted), each one separately
  <split>/loss_text, loss_audio (train) or nll_text, nll_audio (val/test)   by modality of the TARGET token
  <split>/loss_task_<task> (train) or nll_task_<task> (val/test)            by task (asr, tts, text)
  val|test/tts_unit_nll, tts_unit_acc   teacher-forced, on the unit tokens of TTS responses
  test/text_nll                        text-LM NLL (= test/nll_task_text)
  test/asr_wer, asr_cer                greedy ASR (KV cache), normalised transcripts, torchmetrics
  test/asr_wer_mismatched              the same with audio from another utterance: the text-prior baseline
  <split>/expert_load/...              see ExpertLoadAccumulator.summary
  <split>/n_skipped                    bad samples the data loaders skipped (train: running total)
  train/n_truncated                    over-long samples cut to max_length (running total)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning import LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import DictConfig, OmegaConf
from torch import nn

from most_lightning.audio.frontend import build_continuous_encoder
from most_lightning.lit.schedule import linear_warmup_decay
from most_lightning.lit.settings import EVALUATION as DEFAULT_EVALUATION
from most_lightning.lit.settings import OPTIMIZER as DEFAULT_OPTIMIZER
from most_lightning.lit.settings import SCHEDULER as DEFAULT_SCHEDULER
from most_lightning.marks import MODALITY_NAMES
from most_lightning.metrics.expert_load import ExpertLoadAccumulator
from most_lightning.metrics.token_mean import TokenMean
from most_lightning.metrics.transcripts import TranscriptErrorRates
from most_lightning.model import MoSTForCausalLM
from most_lightning.model.audio_input import ContinuousAudioInput
from most_lightning.model.config_groups import audio_expert_ids, build_model_config, moe_layer_ids
from most_lightning.model.router import routers_after_optimizer_step
from most_lightning.model.token_losses import TASK_NAMES, TokenLosses
from most_lightning.text.tokenizer import decode_text_rows

# Teacher-forced metrics shared by validation and test.
_TEACHER_FORCED = (
    ["nll"]
    + [f"nll_{m}" for m in MODALITY_NAMES]
    + [f"nll_task_{t}" for t in TASK_NAMES]
    + ["tts_unit_nll", "tts_unit_acc"]
)


def _plain(cfg: Mapping | None) -> dict[str, Any] | None:
    if cfg is None:
        return None
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(cfg).items()}


def _count_skipped(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        return int(value.sum())
    if isinstance(value, (list, tuple)):
        return sum(int(v) for v in value)
    return int(value)


def build_adamw(model: nn.Module, settings: Mapping[str, Any], fused: bool = True,
                cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over ``model`` with the lit.optimizer settings; no weight decay on vectors (norms, biases); matrices,
    stacked experts [E, out, in] and router gates [E, H] included, are decayed. ``fused=False`` takes torch's
    default implementation instead of the fused kernel; ``cpu_offload`` DeepSpeed's CPU AdamW (same groups),
    which ZeRO's optimizer offload steps on the host."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": float(settings["weight_decay"]), "name": "matrices"},
        {"params": no_decay, "weight_decay": 0.0, "name": "vectors"},
    ]
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=float(settings["lr"]), betas=tuple(float(b) for b in settings["betas"]),
                                eps=float(settings["eps"]), adamw_mode=True)
    return torch.optim.AdamW(
        groups,
        lr=float(settings["lr"]),
        betas=tuple(float(b) for b in settings["betas"]),
        eps=float(settings["eps"]),
        # One multi-tensor kernel per step instead of ~10 small ops per parameter (14 -> 3 ms per step for the
        # tiny preset on one CPU thread); the same AdamW maths. Fused kernels exist for CPU and CUDA tensors.
        fused=(fused and all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)) or None,
    )


class MoSTLitModule(LightningModule):
    def __init__(
        self,
        model: Mapping,
        router: Mapping,
        vocab_size: int | None = None,
        optimizer: Mapping | None = None,
        scheduler: Mapping | None = None,
        evaluation: Mapping | None = None,
        expert_load_every_n_steps: int | None = None,
        tokenizer: Any = None,
        audio: Mapping | None = None,
    ) -> None:
        """model/router: the Hydra groups (see build_model_config); vocab_size: the tokenizer's.
        optimizer: AdamW lr/betas/eps/weight_decay; scheduler: warmup_steps, min_lr_ratio, total_steps (None =
        the trainer's max_steps); evaluation: asr_max_new_tokens, n_asr_examples. tokenizer: the run's tokenizer,
        which validation and test need (the begin/end-of-audio markers of the TTS unit metrics, ASR decoding);
        the module finds it nowhere else. audio: the `audio` group; mode=continuous adds the frozen encoder
        (built here from the config) + trainable projection of MoST-C (model/audio_input.py)."""
        super().__init__()
        # model.init (pretrained import / upcycling): the checkpoint's config.json fixes the architecture
        from most_lightning.model.checkpoint import empty_model
        from most_lightning.model.checkpoint.init import resolve_model_init, wants_weights

        model, vocab_size = resolve_model_init(_plain(model), vocab_size)
        self._init_applied = False
        # plain containers (not DictConfig) so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(
            dict(model=_plain(model), router=_plain(router), vocab_size=vocab_size, optimizer=_plain(optimizer),
                 scheduler=_plain(scheduler), evaluation=_plain(evaluation),
                 expert_load_every_n_steps=expert_load_every_n_steps, audio=_plain(audio))
        )
        self.model_config = build_model_config(model, router, vocab_size)
        if wants_weights(model):  # every weight comes from model.init in setup (or a Lightning checkpoint):
            self.model = empty_model(self.model_config)  # skip a random init of what is overwritten anyway
        else:
            self.model = MoSTForCausalLM(self.model_config)
        # MoST-C: frozen encoder + Linear(feat_dim -> hidden), kept outside the decoder (see audio_input.py)
        encoder = build_continuous_encoder(audio)
        self.audio_input = None if encoder is None else ContinuousAudioInput(
            encoder, self.model_config.hidden_size, self.model_config.initializer_range)
        self.optimizer_settings = {**DEFAULT_OPTIMIZER, **dict(optimizer or {})}
        self.scheduler_settings = {**DEFAULT_SCHEDULER, **dict(scheduler or {})}
        self.evaluation_settings = {**DEFAULT_EVALUATION, **dict(evaluation or {})}
        self.expert_load_every_n_steps = expert_load_every_n_steps
        self._tokenizer = tokenizer

        self.layer_ids = moe_layer_ids(self.model_config)
        self.audio_experts = audio_expert_ids(self.model_config)
        self.expert_load = {
            "train_interval": ExpertLoadAccumulator(),
            "train": ExpertLoadAccumulator(),  # whole fit, for the expert-load monitor
            "val": ExpertLoadAccumulator(),
            "test": ExpertLoadAccumulator(),
        }
        self.val_metrics = nn.ModuleDict({name: TokenMean() for name in _TEACHER_FORCED})
        self.test_metrics = nn.ModuleDict({name: TokenMean() for name in _TEACHER_FORCED})
        self.asr_metrics = nn.ModuleDict({"asr": TranscriptErrorRates(), "asr_mismatched": TranscriptErrorRates()})
        self.asr_examples: dict[str, list[dict[str, str]]] = {}
        self._asr_sets_seen: set[str] = set()
        self.expert_load_snapshot: dict[str, ExpertLoadAccumulator] = {}  # last logged, summed over ranks
        self.n_skipped = {"train": 0, "val": 0, "test": 0}
        self.n_truncated = 0
        self.n_skipped_by_reason: dict[str, int] = {}  # train, running totals by kind (general data pipeline)

    # ------------------------------------------------------------------ pretrained weights (model.init)
    def setup(self, stage: str) -> None:
        """Load the weights model.init names, once, before the first fit/validate/test (a resumed run's
        Lightning checkpoint overwrites them afterwards)."""
        if not self._init_applied:
            from most_lightning.model.checkpoint.init import apply_model_init

            apply_model_init(self.model, self.hparams.model)
            self._init_applied = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._init_applied = True  # trained weights: never overwrite them with the pretrained ones

    # ------------------------------------------------------------------ plumbing
    @property
    def tokenizer(self) -> Any:
        """The tokenizer given to the constructor (tokenizer=...), the one source of it."""
        if self._tokenizer is None:
            raise RuntimeError("MoSTLitModule needs the run's tokenizer for validation and test (TTS unit metrics, "
                               "ASR decoding): build it with MoSTLitModule(..., tokenizer=datamodule.tokenizer)")
        return self._tokenizer

    def forward(self, batch: Mapping[str, Any], compute_logits: bool = True):
        """The model on a batch, with its LM loss when the batch has labels (MoSTOutput); MoST-C audio frames are
        spliced into the embeddings when the batch carries them. compute_logits=False: the loss only (the
        model's chunked LM head on the supervised positions), no [B, T, vocab] logits."""
        extra: dict[str, Any] = {}
        embeds = self._audio_embeds(batch, batch["input_ids"])
        if embeds is not None:
            extra["inputs_embeds"] = embeds
        if batch.get("segment_ids") is not None:  # packed rows: examples attend only within themselves
            extra["segment_ids"] = batch["segment_ids"]
        return self.model(batch["input_ids"], batch["modality"], attention_mask=batch.get("attention_mask"),
                          labels=batch.get("labels"), tasks=batch.get("task"), compute_logits=compute_logits,
                          **extra)

    def _audio_embeds(self, batch: Mapping[str, Any], ids: torch.Tensor) -> torch.Tensor | None:
        """Token embeddings with continuous audio frames spliced in (MoST-C batches), else None."""
        if "audio_mask" not in batch:  # MoST-C on a batch without audio: the projection adds an exact zero
            if self.audio_input is None or not torch.is_grad_enabled():
                return None
            return self.audio_input.without_audio(self.model.embed(ids))
        if self.audio_input is None:
            raise ValueError("the batch carries continuous audio (audio_mask) but the module was built without "
                             "audio=continuous: give the datamodule and the module the same `audio` config")
        return self.audio_input.splice(self.model.embed(ids), batch["audio_mask"], batch["audio_waves"],
                                       batch["audio_wave_lengths"], batch.get("key"))

    def _unit_target_mask(self, losses: TokenLosses) -> torch.Tensor:
        """Target tokens that are speech units (audio marks minus the begin/end-of-audio markers)."""
        mask = losses.modality_mask(1)
        for marker in (self.tokenizer.boa_id, self.tokenizer.eoa_id):
            mask = mask & (losses.target_ids != marker)
        return mask

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch, compute_logits=False)
        lm_loss = out.lm_loss
        loss = lm_loss + out.aux_loss  # the model's loss parts, summed here (router losses come weighted)

        size = batch["input_ids"].shape[0]
        self.log("train/loss", lm_loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        logged = {"train/aux_loss": out.aux_loss.detach()}
        logged |= {f"train/aux/{k}": v.detach() for k, v in out.aux_losses.items()}
        logged |= {f"train/loss_{name}": v.detach() for name, v in out.lm_loss_by_modality().items()}
        logged |= {f"train/loss_task_{task}": v.detach() for task, v in out.lm_loss_by_task().items()}
        self.n_skipped["train"] += _count_skipped(batch.get("n_skipped"))
        logged["train/n_skipped"] = float(self.n_skipped["train"])
        for reason, n in (batch.get("n_skipped_by_reason") or {}).items():
            self.n_skipped_by_reason[reason] = self.n_skipped_by_reason.get(reason, 0) + int(n)
        logged |= {f"train/n_skipped/{r}": float(n) for r, n in self.n_skipped_by_reason.items()}
        self.n_truncated += _count_skipped(batch.get("n_truncated"))
        logged["train/n_truncated"] = float(self.n_truncated)
        logged["train/n_tokens"] = out.token_losses.n_tokens.float()
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=size)

        self._track_expert_load(out.router_stats)
        return loss

    def _track_expert_load(self, router_stats: Sequence) -> None:
        self.expert_load["train"].update(router_stats)
        interval = self.expert_load["train_interval"]
        interval.update(router_stats)
        every = self.expert_load_every_n_steps or (self.trainer.log_every_n_steps if self._trainer else 50)
        if (self.global_step + 1) % max(every, 1) == 0:
            self._log_expert_load("train", interval, on_step=True)
            interval.reset()

    def _global_sum(self, value: float) -> torch.Tensor:
        total = torch.tensor(float(value), device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        return total

    def _log_expert_load(self, split: str, acc: ExpertLoadAccumulator, on_step: bool = False) -> dict[str, float]:
        reduce = None
        if self._trainer is not None and self.trainer.world_size > 1:
            reduce = lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
        acc = acc.reduced(reduce)
        self.expert_load_snapshot[split] = acc
        summary = acc.summary(self.audio_experts, self.layer_ids)
        logged = {f"{split}/expert_load/{k}": v for k, v in summary.items()}
        if logged and self._trainer is not None:
            # already summed over ranks; sync_dist at epoch level only averages identical values (and keeps
            # Lightning from warning)
            self.log_dict(logged, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        return logged

    # ------------------------------------------------------------------ teacher-forced evaluation
    def _teacher_forced_update(self, batch: Mapping[str, Any], metrics: nn.ModuleDict, split: str) -> None:
        out = self(batch)
        losses = out.token_losses
        metrics["nll"].update(*losses.sum_and_count())
        for m, name in enumerate(MODALITY_NAMES):
            metrics[f"nll_{name}"].update(*losses.sum_and_count(losses.modality_mask(m)))
        for task in TASK_NAMES:
            metrics[f"nll_task_{task}"].update(*losses.sum_and_count(losses.task_mask(batch["task"], task)))
        units = losses.task_mask(batch["task"], "tts") & losses.valid
        if "tts" in batch["task"]:  # the unit tokens of the TTS responses (telling markers apart needs the tokenizer)
            units = units & self._unit_target_mask(losses)
        metrics["tts_unit_nll"].update(*losses.sum_and_count(units))
        metrics["tts_unit_acc"].update((losses.correct & units).sum(), units.sum())
        self.expert_load[split].update(out.router_stats)
        self.n_skipped[split] += _count_skipped(batch.get("n_skipped"))

    def _log_metrics(self, split: str, metrics: nn.ModuleDict) -> None:
        values = {f"{split}/{name}": metric.compute() for name, metric in metrics.items()}
        if split == "test":
            values["test/text_nll"] = values["test/nll_task_text"]
        # NaN = nothing of that kind in the split (e.g. no TTS sample): leave it out rather than log NaN.
        values = {k: v for k, v in values.items() if not torch.isnan(v)}
        values[f"{split}/n_skipped"] = self._global_sum(self.n_skipped[split])
        self.log_dict(values, sync_dist=True)  # values are already global (torchmetrics sync); see above
        for metric in metrics.values():
            metric.reset()
        self._log_expert_load(split, self.expert_load[split])
        self.expert_load[split].reset()
        self.n_skipped[split] = 0

    def on_validation_epoch_start(self) -> None:
        self.expert_load["val"].reset()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._teacher_forced_update(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    # ------------------------------------------------------------------ test: teacher forcing + ASR generation
    def on_test_epoch_start(self) -> None:
        self.expert_load["test"].reset()
        self.asr_examples = {}
        self._asr_sets_seen = set()

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if "prompt_ids" in batch:
            # mismatched-audio ASR batches say so themselves (the datamodule's mismatched loader flags them)
            self._asr_generation_update(batch, "asr_mismatched" if batch.get("mismatched") else "asr")
        else:
            self._teacher_forced_update(batch, self.test_metrics, "test")

    @torch.no_grad()
    def transcribe(self, batch: Mapping[str, Any]) -> list[str]:
        """Greedy ASR hypotheses for a generation batch (left-padded prompts)."""
        tok = self.tokenizer
        embeds = self._audio_embeds(batch, batch["prompt_ids"])
        new_tokens = self.model.generate(
            batch["prompt_ids"],
            batch["prompt_modality"],
            batch["prompt_mask"],
            max_new_tokens=int(self.evaluation_settings["asr_max_new_tokens"]),
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            modality_of=tok.modality_of,
            **({} if embeds is None else {"inputs_embeds": embeds}),
        )
        return decode_text_rows(tok, new_tokens)

    def _asr_generation_update(self, batch: Mapping[str, Any], name: str) -> None:
        hypotheses = self.transcribe(batch)
        self.asr_metrics[name].update(hypotheses, batch["reference_text"])
        self._asr_sets_seen.add(name)
        examples = self.asr_examples.setdefault(name, [])
        keys = batch.get("key") or [""] * len(hypotheses)
        for key, ref, hyp in zip(keys, batch["reference_text"], hypotheses):
            if len(examples) < int(self.evaluation_settings["n_asr_examples"]):
                examples.append({"key": key, "reference": ref, "hypothesis": hyp})
        self.n_skipped["test"] += _count_skipped(batch.get("n_skipped"))

    def on_test_epoch_end(self) -> None:
        for name, metric in self.asr_metrics.items():
            if name not in self._asr_sets_seen:  # every rank runs every loader, so this agrees across ranks
                continue
            scores = metric.compute()
            self.log_dict(
                {
                    f"test/{name}_wer": scores["wer"],
                    f"test/{name}_cer": scores["cer"],
                    f"test/{name}_n_utterances": scores["n_utterances"].float(),
                },
                sync_dist=True,
            )
            metric.reset()
        self._log_metrics("test", self.test_metrics)

    # ------------------------------------------------------------------ optimisation
    def _clips_under_mixed_precision(self) -> bool:
        """Lightning refuses to clip the gradients of a fused optimizer under its mixed-precision plugin (a fused
        step unscales fp16 gradients itself, so they would be clipped while still scaled)."""
        trainer = self._trainer
        return (trainer is not None and isinstance(trainer.precision_plugin, MixedPrecision)
                and (trainer.gradient_clip_val or 0) > 0)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # routers with per-step state (e.g. the aux-loss-free bias) update it from the step's load, summed over ranks
        reduce = None
        if self._trainer is not None and self.trainer.world_size > 1:
            reduce = lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
        routers_after_optimizer_step(self.model, reduce)

    def configure_optimizers(self) -> dict[str, Any]:
        # the decoder + MoST-C's projection (the frozen encoder has no grad)
        from most_lightning.lit.strategies import offloads_optimizer

        optimizer = build_adamw(self, self.optimizer_settings, fused=not self._clips_under_mixed_precision(),
                                cpu_offload=offloads_optimizer(getattr(getattr(self._trainer, "strategy", None),
                                                                       "config", None)))
        sched = self.scheduler_settings
        total = sched.get("total_steps") or self.trainer.estimated_stepping_batches
        if total is None or total == float("inf"):
            raise ValueError(
                "the linear LR schedule needs a finite number of steps: set trainer.max_steps "
                "or lit.scheduler.total_steps"
            )
        scheduler = linear_warmup_decay(
            optimizer, int(sched["warmup_steps"]), int(total), float(sched["min_lr_ratio"])
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
