"""experiments/bench_model_gpu.py: its FLOP count against the model's real parameters, and an end-to-end run of
every row at a tiny size on the CPU (the GPU run itself is experiments/gpu_check.sh)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import bench_model_gpu  # noqa: E402

from most_lightning.model import MoSTForCausalLM  # noqa: E402


@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "v2-lite-width"])
def test_active_parameters_equal_the_matrices_a_token_passes_when_every_expert_is_active(tiny):
    """With top_k = n_routed_experts every matrix is active: the count must equal the model's own parameters,
    less the embedding lookup and the norm vectors (built on the meta device: no memory)."""
    config = bench_model_gpu.lite_config(3, tiny)
    config = config.replace(top_k=config.n_routed_experts, router=dict(name="vanilla"))
    with torch.device("meta"):
        model = MoSTForCausalLM(config)
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() > 1 and "embed_tokens" not in name)
    assert bench_model_gpu.active_params(config) == matrices
    dense = bench_model_gpu.dense_config(bench_model_gpu.lite_config(3, tiny))
    assert dense.intermediate_size == (2 * 32 + 32 if tiny else 6 * 1408 + 2816)  # top_k x width + shared
    assert not dense.has_moe


@pytest.mark.slow
def test_every_row_runs_end_to_end_on_the_cpu(tmp_path, capsys, single_thread):
    pytest.importorskip("transformers")
    tables = bench_model_gpu.main(["--device", "cpu", "--tiny", "--layers", "2", "--seqs", "32", "--tokens", "64",
                                   "--warmup", "0", "--steps", "1", "--peak-tflops", "1",
                                   "--profile", str(tmp_path)])
    rows = tables[32]
    assert list(rows) == list(bench_model_gpu.ROWS)
    for name, row in rows.items():
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1, (name, row)
        assert (tmp_path / f"trace_{name}.json").stat().st_size > 0
    out = capsys.readouterr().out
    assert "MFU = (6 x active params x tokens" in out and "transformers' best" in out
