"""The end-of-run summary: one rich table of the key metrics, the ASR WER next to its text-prior baseline, and a
one-line verdict of whether the model learned anything from the audio.

The text-prior baseline (`test/asr_mismatched_wer`) is the WER of the same model when each test utterance's audio
is swapped for another sentence's: what the decoder reaches from the prompt and its language model alone. An ASR
WER that is not clearly below it means the model has not learned to listen yet, whatever the WER itself says.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

# (metric, label, its text-prior baseline)
ROWS = (
    ("val/nll", "validation NLL", None),
    ("test/asr_wer", "ASR WER", "test/asr_mismatched_wer"),
    ("test/asr_cer", "ASR CER", "test/asr_mismatched_cer"),
    ("test/tts_unit_acc", "TTS unit accuracy", None),
    ("test/tts_unit_nll", "TTS unit NLL", None),
    ("test/text_nll", "text NLL", None),
    ("test/expert_load/audio_to_audio_group", "audio tokens in the audio group", None),
    ("test/expert_load/load_max_over_mean_text", "expert load max/mean, text", None),
    ("test/expert_load/load_max_over_mean_audio", "expert load max/mean, audio", None),
)
# the ASR WER must be this much (absolute) below the text-prior WER to count as learned from the audio
MARGIN = 0.02


def _finite(metrics: Mapping[str, float], name: str) -> float | None:
    value = metrics.get(name)
    return float(value) if value is not None and math.isfinite(value) else None


def text_prior_verdict(metrics: Mapping[str, float], margin: float = MARGIN) -> str | None:
    """One line: did the ASR WER beat the text-prior baseline by at least `margin`? None without both numbers."""
    wer, prior = _finite(metrics, "test/asr_wer"), _finite(metrics, "test/asr_mismatched_wer")
    if wer is None or prior is None:
        return None
    if wer <= prior - margin:
        return (f"The model learned beyond the text prior: ASR WER {wer:.3f} vs {prior:.3f} with mismatched audio "
                f"({prior - wer:.3f} lower).")
    return (f"The model did not learn beyond the text prior: ASR WER {wer:.3f} vs {prior:.3f} with mismatched audio "
            f"(needs to be at least {margin} lower); train longer or check the audio front end.")


TTS = "eval/tts/"  # run.py's eval_after_test=[tts]: TTS through a vocoder, judged by a recogniser


def tts_rows(metrics: Mapping[str, float]) -> list[tuple[str, str, None]]:
    """(metric, label, None) of the TTS eval's key metrics present: per vocoder the WER of the model's speech and
    of the vocoder on the true units (its ceiling), the recogniser on the original audio, and stopping."""
    rows = []
    ceilings = (TTS + "wer_resynth_", TTS + "wer_ground_truth")
    vocoders = sorted(k.removeprefix(TTS + "wer_") for k in metrics
                      if k.startswith(TTS + "wer_") and not k.startswith(ceilings))
    for name in vocoders:
        rows.append((f"{TTS}wer_{name}", f"TTS WER ({name} vocoder)", None))
        rows.append((f"{TTS}wer_resynth_{name}", f"TTS WER, {name} on the true units", None))
    rows.append((f"{TTS}wer_ground_truth", "TTS WER, original audio", None))
    rows.append((f"{TTS}stop_rate", "TTS stop rate (end-of-audio, length +-30%)", None))
    rows.append((f"{TTS}n_did_not_stop", "TTS sequences that did not stop", None))
    return rows


def summary_rows(metrics: Mapping[str, float]) -> list[tuple[str, str, str]]:
    """(label, value, text-prior value or "") of the key metrics present."""
    rows = []
    for name, label, baseline in (*ROWS, *tts_rows(metrics)):
        if name not in metrics:
            continue
        value, prior = _finite(metrics, name), _finite(metrics, baseline) if baseline else None
        rows.append((label, "n/a" if value is None else f"{value:.4g}", "" if prior is None else f"{prior:.4g}"))
    return rows


def print_run_summary(metrics: Mapping[str, float]) -> None:
    """Print the table to the console (stdout) and log the verdict (console and run.log), once, at the end."""
    from rich import get_console
    from rich.table import Table

    rows = summary_rows(metrics)
    if not rows:
        return
    table = Table(title="run summary", title_justify="left", header_style="bold")  # metrics.json has every metric
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("text prior", justify="right")  # the same model on mismatched audio
    for row in rows:
        table.add_row(*row)
    get_console().print(table)
    verdict = text_prior_verdict(metrics)
    if verdict is not None:
        logging.getLogger("most_lightning.run").info(verdict)
