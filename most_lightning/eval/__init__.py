"""Evaluation tasks (ASR, TTS, text perplexity, minimal pairs, spoken QA, lm-eval) and the suite driver behind
`python run.py mode=eval`; the metrics they compute live in most_lightning.metrics."""
