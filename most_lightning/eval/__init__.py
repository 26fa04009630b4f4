"""Evaluation: ASR transcript scoring (and, later, TTS / speech-LM / spoken-QA / text benchmarks)."""

from most_lightning.eval.asr import TranscriptErrorRates, normalize_transcript

__all__ = ["TranscriptErrorRates", "normalize_transcript"]
