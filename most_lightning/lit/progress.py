"""What a run shows while it trains: Lightning's rich progress bar on a terminal, log lines elsewhere; and the model
summary without Lightning's FLOPs column when nothing counted FLOPs.

A rich live display written to a file or a batch job's log keeps only its last frame, so a long job shows nothing
until it ends. When stdout is not a terminal, StepRunProgressBar turns its display off and logs a line every N
optimiser steps instead: global step, loss, tokens/s and the estimated time left (plus one line per validation).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

log = logging.getLogger("most_lightning.progress")
MODES = ("auto", "bar", "log")
VALIDATION_HEADLINE = ("val/nll", "val/asr_wer", "val/tts_unit_acc", "val/text_nll")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def batch_tokens(batch: Any) -> int | None:
    """Real (non-padding) tokens of a training batch: its attention mask's sum, else its input ids' count."""
    if isinstance(batch, Mapping):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return int(batch["input_ids"].numel())
    return None


class StepRunProgressBar(RichProgressBar):
    """RichProgressBar that prints "Epoch 3" rather than "Epoch 3/-2" when the number of epochs is unbounded, and
    that logs progress lines instead of drawing when stdout is not a terminal.

    Our trainers stop at ``max_steps`` and leave epochs open (``max_epochs: -1``; Lightning also turns a null
    max_epochs into -1 when max_steps is set), and Lightning's bar prints ``max_epochs - 1`` after the epoch.

    mode: 'auto' (the bar on a terminal, log lines otherwise), 'bar' or 'log'.
    log_every_n_steps: optimiser steps between log lines (null: trainer.log_every_n_steps).
    """

    def __init__(self, *args: Any, mode: str = "auto", log_every_n_steps: int | None = None, **kwargs: Any) -> None:
        if mode not in MODES:
            raise ValueError(f"callbacks.rich_progress_bar.mode={mode!r}: allowed values are {list(MODES)}")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"callbacks.rich_progress_bar.log_every_n_steps={log_every_n_steps}: must be >= 1 or null")
        super().__init__(*args, **kwargs)
        self.mode = mode
        self.log_every_n_steps = log_every_n_steps
        self.logging_progress = False
        self._start: tuple[float, int] | None = None  # (time, global step) when training started
        self._tokens = 0
        self._last_logged_step = -1

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        # as Lightning does: pad to the validation description's width, so the bars do not flicker
        return f"{description:{len(self.validation_description)}}"

    # ---- log lines when stdout is not a terminal -----------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        use_log = self.mode == "log" or (self.mode == "auto" and not sys.stdout.isatty())
        if use_log:
            self.disable()
        self.logging_progress = use_log and trainer.is_global_zero

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start, self._tokens, self._last_logged_step = (time.monotonic(), trainer.global_step), 0, -1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.logging_progress or self._start is None:
            return
        self._tokens += batch_tokens(batch) or 0
        step = trainer.global_step
        every = self.log_every_n_steps or trainer.log_every_n_steps or 50
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        if step != self._last_logged_step and (step % every == 0 or last):
            self._last_logged_step = step
            log.info(self.progress_line(trainer, outputs))

    def progress_line(self, trainer: Trainer, outputs: Any) -> str:
        start_time, start_step = self._start
        elapsed = time.monotonic() - start_time
        step, max_steps = trainer.global_step, trainer.max_steps
        parts = [f"step {step}/{max_steps}" if max_steps and max_steps > 0 else f"step {step}"]
        loss = trainer.callback_metrics.get("train/loss")
        if loss is None and isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        if elapsed > 0 and self._tokens:
            parts.append(f"{self._tokens / elapsed:,.0f} tokens/s")
        done = step - start_step
        if max_steps and max_steps > 0 and done > 0:
            parts.append(f"ETA {format_duration(elapsed / done * (max_steps - step))}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        return " | ".join(parts)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.logging_progress and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            shown = ", ".join(f"{k} {float(metrics[k]):.4g}" for k in VALIDATION_HEADLINE if k in metrics)
            log.info(f"validation at step {trainer.global_step}: {shown or 'no metrics'}")


class ModelSummaryTable(ModelSummary):
    """Lightning's model summary as a rich table, leaving out the FLOPs column and total when nothing counted FLOPs
    (Lightning counts them only for a module with an example_input_array; otherwise every row and the total read 0).
    """

    NUMERIC = ("Params", "Params per Device", "FLOPs", "In sizes", "Out sizes")

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs" or total_flops]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in ModelSummaryTable.NUMERIC else "left",
                             style="dim" if not name.strip() else None, no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*map(str, row))
        console = get_console()
        console.print(table)
        totals = [("Trainable params", get_human_readable_count(trainable_parameters)),
                  ("Non-trainable params", get_human_readable_count(total_parameters - trainable_parameters)),
                  ("Total params", get_human_readable_count(total_parameters)),
                  ("Total estimated model params size (MB)", f"{model_size:,.3f}"),
                  ("Modules in train / eval mode", f"{total_training_modes['train']} / {total_training_modes['eval']}")]
        if total_flops:
            totals.append(("Total FLOPs", get_human_readable_count(total_flops)))
        console.print("\n".join(f"[bold]{name}[/]: {value}" for name, value in totals))
