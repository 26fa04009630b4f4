"""Whole-model training step (forward + backward + AdamW step): MoST ``tiny`` against transformers' DeepSeek-V2.

transformers' DeepseekV2ForCausalLM is built from the same numbers (hidden, layers, MLA dims, experts, top-k,
shared experts, vocab) and gets a copy of our weights, so both models route the tokens alike and do the same
work. Rows are interleaved repetition by repetition in one process (timing helpers from bench_moe.py).

    python experiments/bench_model_step.py           # tiny preset, batch 8 x 256, 2 threads
    python experiments/bench_model_step.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import Row, print_table, run_interleaved  # noqa: E402

from most_lightning.model import MoSTConfig, MoSTForCausalLM  # noqa: E402
from most_lightning.model.hf_compat import to_hf_deepseek_config, to_hf_state_dict  # noqa: E402


def hf_config(c: MoSTConfig, experts_implementation: str):
    """The transformers DeepseekV2Config with the same architecture numbers as ``c``."""
    config = to_hf_deepseek_config(c, n_group=1, topk_group=1)
    config._experts_implementation = experts_implementation
    return config


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor,
                  modality: torch.Tensor, ours: bool) -> Callable[[], None]:
    def step() -> None:
        if ours:
            out = model(ids, modality)
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()) + out.aux_loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--retries", type=int, default=3, help="re-runs of a repetition disturbed by other processes")
    parser.add_argument("--wait-budget", type=float, default=300.0,
                        help="seconds to wait in all for a quiet machine before re-running disturbed repetitions")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 2 x 64, 2 repetitions")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.reps, args.retries = 2, 64, 2, 0
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])

    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    torch.manual_seed(0)
    ids = None
    rows = []
    reference: MoSTForCausalLM | None = None
    for router in ("vanilla", "modality_aware"):
        config = MoSTConfig.from_preset(args.preset, router=dict(name=router), **overrides)
        model = MoSTForCausalLM(config).train()
        if reference is None:
            reference = model
            ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len))
            modality = torch.zeros_like(ids)
            modality[:, args.seq_len // 2:] = 1  # half text, half audio positions
        else:
            model.load_state_dict(reference.state_dict())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
        rows.append(Row(f"MoST {args.preset} ({router} router)", training_step(model, optimizer, ids, modality, True)))
    from transformers import DeepseekV2ForCausalLM

    for impl in ("eager", "grouped_mm"):
        theirs = DeepseekV2ForCausalLM(hf_config(reference.config, impl)).train()
        missing, unexpected = theirs.load_state_dict(to_hf_state_dict(reference), strict=False)
        if unexpected or [k for k in missing if "rotary" not in k]:
            raise RuntimeError(f"weight copy into transformers failed: missing {missing}, unexpected {unexpected}")
        optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95))
        attn = theirs.config._attn_implementation
        rows.append(Row(f"transformers DeepseekV2 ({impl} experts, {attn} attn)",
                        training_step(theirs, optimizer, ids, modality, False)))

    # Same weights, same routing: the two models must agree on the loss before any timing means anything.
    with torch.no_grad():
        reference.eval(), theirs.eval()
        ours_loss = F.cross_entropy(reference(ids, modality).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        their_loss = theirs(input_ids=ids, labels=ids).loss
        reference.train(), theirs.train()
    if not torch.allclose(ours_loss, their_loss, rtol=1e-4):
        raise RuntimeError(f"models disagree before timing: loss {ours_loss.item():.6f} vs {their_loss.item():.6f}")
    c = reference.config
    print(f"command: {command}\ntorch {torch.__version__}, {torch.get_num_threads()} threads, fp32; preset "
          f"{args.preset}: hidden {c.hidden_size}, {c.num_layers} layers, {c.n_routed_experts} experts x "
          f"{c.moe_intermediate_size} top-{c.top_k}, {c.n_shared_experts} shared, vocab {c.vocab_size}; "
          f"batch {args.batch} x {args.seq_len}")
    run_interleaved(rows, args.reps, retries=args.retries, wait_budget=args.wait_budget, quiet=args.quick)
    ratios = print_table("training step: forward + backward + AdamW", rows, rows[0].name,
                         note=f"ratios to our vanilla-router row; medians of {args.reps} interleaved repetitions")
    ours = statistics.median(rows[0].times)
    for row in rows[2:]:
        print(f"speed-up of MoST (vanilla) over {row.name}: {statistics.median(row.times) / ours:.2f}x")
    return ratios


if __name__ == "__main__":
    main()
