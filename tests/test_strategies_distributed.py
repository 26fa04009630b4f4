"""Two CPU ranks over gloo, the real DDP and DeepSpeed engines, a tiny MoST (tests/distributed_worker.py).

Oracle: one process that accumulates the gradients of the two ranks' batches (what data parallelism computes).
Tolerances: the gradient-norm clipping (set, 1.0) sums the partitioned norms in another order, so the weights
agree to float32 rounding after a few AdamW steps, not bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = "tests/distributed_worker.py"
TIMEOUT = 600
STEPS = 3


def run_ranks(tmp: Path, world: int, **spec) -> tuple[dict, dict[str, torch.Tensor]]:
    spec = {"steps": STEPS, "out": str(tmp), **spec}
    results = launch([WORKER, json.dumps(spec)], world, timeout=TIMEOUT)
    failed = [(r, res.stdout[-4000:]) for r, res in enumerate(results) if res.returncode != 0]
    assert not failed, f"ranks failed: {failed}"
    return json.loads((tmp / "result.json").read_text()), torch.load(tmp / "weights.pt", weights_only=True)


def assert_same_weights(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], atol: float) -> float:
    assert set(ref) == set(got)
    worst = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    assert worst <= atol, f"max |difference| {worst:.3g} > {atol}"
    return worst


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Single process, gradient accumulation over the two ranks' batches: mixed batches and the modality split."""
    out = {}
    for name, extra in {"mixed": {}, "split": {"modalities": "split", "continuous": True}}.items():
        tmp = tmp_path_factory.mktemp(f"single_{name}")
        result, weights = run_ranks(tmp, 1, strategy="single", emulate_ranks=2, **extra)
        assert result["global_step"] == STEPS
        out[name] = weights
    return out


@pytest.fixture(scope="module")
def initial_weights() -> dict[str, torch.Tensor]:
    from tests.distributed_worker import build_module

    module = build_module({})
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3"])
def test_two_ranks_match_one_process(strategy, reference, initial_weights, tmp_path):
    result, weights = run_ranks(tmp_path, 2, strategy=strategy)
    assert result["world_size"] == 2 and result["global_step"] == STEPS
    expected = "DDPStrategy" if strategy == "ddp" else "CPUDeepSpeedStrategy"
    assert result["strategy"] == expected
    worst = assert_same_weights(reference["mixed"], weights, atol=2e-5)
    # the comparison is not vacuous: training moved every weight matrix by far more than the tolerance
    moved = min(float((reference["mixed"][k] - initial_weights[k]).abs().max()) for k in initial_weights)
    assert moved > 1e-3, moved
    print(f"{strategy}: max |w - w_single| = {worst:.3g} after {STEPS} steps (weights moved >= {moved:.3g})")


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
def test_text_rank_and_speech_rank_train_together(strategy, reference, tmp_path):
    """The key regression: rank 0 sees text only, rank 1 speech only (MoST-C frames through the projection).
    Before the projection added its exact zero on text-only batches, ZeRO aborted with a gloo collective
    mismatch (the projection's 2,080 gradient elements missing on rank 0)."""
    result, weights = run_ranks(tmp_path, 2, strategy=strategy, modalities="split", continuous=True,
                                precision="32-true")
    assert result["global_step"] == STEPS
    assert "audio_input.proj.weight" in weights
    worst = assert_same_weights(reference["split"], weights, atol=2e-5)
    print(f"{strategy}, text rank + speech rank: max |w - w_single| = {worst:.3g}")
