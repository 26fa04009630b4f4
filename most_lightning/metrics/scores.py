"""Small pure scores of eval tasks: minimal-pair accuracy from log-likelihoods, spoken-QA answer matching."""

from __future__ import annotations

from collections.abc import Sequence

from most_lightning.metrics.normalize import TextNormalizer


def pair_accuracy(scores: list[tuple[tuple[float, int], tuple[float, int]]]) -> dict[str, float]:
    """scores: ((ll_correct, n_correct), (ll_incorrect, n_incorrect)) per pair -> accuracies (ties = 0.5)."""
    def acc(values: list[tuple[float, float]]) -> float:
        return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in values) / len(values)

    return {"acc_sum": acc([(g[0], b[0]) for g, b in scores]),
            "acc_mean": acc([(g[0] / g[1], b[0] / b[1]) for g, b in scores])}


def exact_match(prediction: str, answers: Sequence[str], normalizer: TextNormalizer) -> bool:
    pred = normalizer(prediction)
    return bool(pred) and any(pred == normalizer(a) for a in answers)


def contains_answer(prediction: str, answers: Sequence[str], normalizer: TextNormalizer) -> bool:
    pred = f" {normalizer(prediction)} "
    return any(normalizer(a) and f" {normalizer(a)} " in pred for a in answers)
