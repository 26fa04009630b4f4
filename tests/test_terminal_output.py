"""A clean terminal: the known third-party warnings and tips are filtered (narrowly: by message and module), no
"Total FLOPs: 0" line, progress as log lines when stdout is not a terminal, and one end-of-run summary table with
the text-prior baseline and a verdict."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from conftest import FAST_OVERRIDES, REPO_ROOT
from most_lightning.lit.run_summary import summary_rows, text_prior_verdict
from most_lightning.lit.runtime import RANK_ZERO_LOGGER, quiet_known_third_party_noise

LEAFSPEC = ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
            "treespec.is_leaf()` instead.")
ITERABLE_LEN = ("Your `IterableDataset` has `__len__` defined. In combination with multi-process data loading (when "
                "num_workers > 1), `__len__` could be inaccurate")
LITLOGGER_TIP = ("💡 Tip: For seamless cloud logging and experiment tracking, try installing "
                 "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger, which logs metrics")


def _shown(message: str, category: type[Warning], module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_third_party_noise()
        warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 21, module=module)
    return bool(caught)


@pytest.mark.parametrize("message, category, module", [
    (LEAFSPEC, FutureWarning, "lightning.pytorch.utilities._pytree"),
    (ITERABLE_LEN, UserWarning, "lightning.pytorch.utilities.data"),
])
def test_known_warnings_are_filtered_only_from_their_module(message, category, module):
    assert not _shown(message, category, module)
    assert _shown(message, category, "my_project.training")  # the same text from elsewhere still shows
    assert _shown("another warning", category, module)  # and other warnings of that module too


def test_lightning_tips_are_dropped_and_other_lines_kept(caplog):
    quiet_known_third_party_noise()
    quiet_known_third_party_noise()  # idempotent: one filter
    logger = logging.getLogger(RANK_ZERO_LOGGER)
    assert sum(type(f).__name__ == "_DropKnownLines" for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=RANK_ZERO_LOGGER):
        logger.info(LITLOGGER_TIP)
        logger.info("GPU available: False, used: False")
    assert "litlogger" not in caplog.text and "GPU available" in caplog.text


def test_verdict_against_the_text_prior():
    assert text_prior_verdict({"test/asr_wer": 0.80, "test/asr_mismatched_wer": 1.01}).startswith(
        "The model learned beyond the text prior: ASR WER 0.800 vs 1.010")
    assert text_prior_verdict({"test/asr_wer": 1.0, "test/asr_mismatched_wer": 1.01}).startswith(
        "The model did not learn beyond the text prior")
    assert text_prior_verdict({"test/asr_wer": 0.5}) is None
    assert text_prior_verdict({"test/asr_wer": float("nan"), "test/asr_mismatched_wer": 1.0}) is None
    rows = summary_rows({"val/nll": 5.0, "test/asr_wer": 0.954, "test/asr_mismatched_wer": 1.008,
                         "test/tts_unit_acc": 0.233})
    assert rows == [("validation NLL", "5", ""), ("ASR WER", "0.954", "1.008"), ("TTS unit accuracy", "0.233", "")]


def test_summary_shows_the_tts_eval_of_each_vocoder_with_its_ceilings():
    rows = summary_rows({"test/asr_wer": 0.35, "eval/tts/wer_unit_mel": 0.61, "eval/tts/wer_resynth_unit_mel": 0.38,
                         "eval/tts/cer_unit_mel": 0.3, "eval/tts/wer_ground_truth": 0.28, "eval/tts/stop_rate": 0.95,
                         "eval/tts/n_did_not_stop": 1.0})
    assert rows == [("ASR WER", "0.35", ""), ("TTS WER (unit_mel vocoder)", "0.61", ""),
                    ("TTS WER, unit_mel on the true units", "0.38", ""), ("TTS WER, original audio", "0.28", ""),
                    ("TTS stop rate (end-of-audio, length +-30%)", "0.95", ""),
                    ("TTS sequences that did not stop", "1", "")]


def test_progress_bar_mode_is_checked():
    from most_lightning.lit.progress import StepRunProgressBar

    with pytest.raises(ValueError, match=r"callbacks\.rich_progress_bar\.mode='fancy': allowed values"):
        StepRunProgressBar(mode="fancy")


@pytest.mark.slow
def test_a_run_sent_to_a_file_logs_progress_and_ends_with_the_summary(tmp_path, shared_data_dir):
    """The default callbacks (rich bar, model summary) with stdout and stderr going to pipes, as in a batch job."""
    overrides = [o for o in FAST_OVERRIDES if not o.startswith("callbacks.rich_progress_bar")]
    result = subprocess.run([sys.executable, "run.py", *overrides, "trainer.max_steps=8", "trainer.val_check_interval=5",
                             "trainer.log_every_n_steps=4", f"paths.data_dir={shared_data_dir}",
                             f"paths.log_dir={tmp_path / 'logs'}"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout + result.stderr
    for noise in ("litlogger", "LeafSpec", "`__len__` defined", "FLOPs", "Trainer already configured"):
        assert noise not in out, noise
    for line in ("step 4/8 | loss ", "step 8/8 | loss "):
        assert line in out, out[-3000:]
    assert "tokens/s | ETA " in out and "validation at step 5: val/nll" in out
    assert "validation at step 8: val/nll" in out  # the final pass (the last one at step 5 was older)
    assert "Total params" in out and "run summary" in out and "text prior" in out
    assert "learn beyond the text prior: ASR WER" in out
