"""Whole-model training step (forward + backward + AdamW step): MoST ``tiny`` against transformers' DeepSeek-V2.

transformers' DeepseekV2ForCausalLM is built from the same numbers (hidden, layers, MLA dims, experts, top-k,
shared experts, vocab) and gets a copy of our weights, so both models route the tokens alike and do the same
work. Rows are interleaved repetition by repetition in one process (timing helpers from bench_moe.py).

Each side trains the way its users get it: ours through the LightningModule's path (the model's fused LM-head
loss, model/token_losses.py; fused AdamW from lit/module.build_adamw), transformers with its defaults (labels=
loss, its default attention implementation, torch AdamW with the same hyper-parameters). One extra row gives
transformers the fused AdamW too, to show how much of the gap is the optimizer.

    python experiments/bench_model_step.py                        # tiny preset, batch 8 x 256, 2 threads
    python experiments/bench_model_step.py --prompt-fraction 0.5  # first half of each row unsupervised (-100)
    python experiments/bench_model_step.py --memory               # peak RSS of one step per row (subprocesses)
    python experiments/bench_model_step.py --threads 1 --clock thread  # CPU time of the one compute thread:
        # on a machine shared with other jobs, wall time at 2 threads mostly measures OpenMP threads waiting
        # for descheduled partners; one thread's own CPU time is (nearly) blind to the other processes
    python experiments/bench_model_step.py --quick                # smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_moe import (Row, keep_freed_memory, malloc_note, print_table, run_interleaved,  # noqa: E402
                       run_interleaved_thread_clock)

from most_lightning.lit.module import build_adamw  # noqa: E402
from most_lightning.model import MoSTConfig, MoSTForCausalLM  # noqa: E402
from most_lightning.model.hf_compat import to_hf_deepseek_config, to_hf_state_dict  # noqa: E402


def hf_config(c: MoSTConfig, experts_implementation: str):
    """The transformers DeepseekV2Config with the same architecture numbers as ``c``."""
    config = to_hf_deepseek_config(c, n_group=1, topk_group=1)
    config._experts_implementation = experts_implementation
    return config


LR, BETAS, WEIGHT_DECAY = 1e-4, (0.9, 0.95), 0.01


def our_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """What MoSTLitModule.configure_optimizers builds (fused AdamW, no decay on norm weights)."""
    return build_adamw(model, dict(lr=LR, betas=BETAS, eps=1e-8, weight_decay=WEIGHT_DECAY))


def their_optimizer(model: torch.nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                             fused=fused or None)


def our_loss(model: MoSTForCausalLM, ids, labels, modality, fused: bool = True) -> torch.Tensor:
    """LM loss + router aux losses as MoSTLitModule.training_step computes them."""
    if fused:
        return model(ids, modality, labels=labels, compute_logits=False).loss
    out = model(ids, modality)
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()) + out.aux_loss


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor,
                  modality: torch.Tensor, ours: bool, labels: torch.Tensor | None = None,
                  fused_loss: bool = True) -> Callable[[], None]:
    labels = ids if labels is None else labels

    def step() -> None:
        if ours:
            loss = our_loss(model, ids, labels, modality, fused_loss)
        else:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def build_rows(args, kinds: list[str]) -> tuple[list[Row], MoSTForCausalLM, torch.nn.Module | None, dict]:
    """Models, optimizers and one training-step closure per row kind (all from one weight copy)."""
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    torch.manual_seed(0)
    config = MoSTConfig.from_preset(args.preset, router=dict(name="vanilla"), **overrides)
    reference = MoSTForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len))
    modality = torch.zeros_like(ids)
    modality[:, args.seq_len // 2:] = 1  # half text, half audio positions
    labels = ids.clone()
    labels[:, : int(args.prompt_fraction * args.seq_len)] = -100  # a prompt that gets no loss
    data = dict(ids=ids, modality=modality, labels=labels)
    rows, theirs = [], None
    for kind in kinds:
        if kind.startswith("ours"):
            router = "modality_aware" if "modality_aware" in kind else "vanilla"
            model = reference if kind == "ours" else None
            if model is None:
                model = MoSTForCausalLM(config.replace(router=dict(name=router))).train()
                model.load_state_dict(reference.state_dict())
            fused = kind != "ours-plain-loss"
            name = (f"MoST {args.preset} ({router} router)" if fused
                    else f"MoST {args.preset} (vanilla, unfused loss + torch AdamW)")
            optimizer = our_optimizer(model) if fused else their_optimizer(model)
            rows.append(Row(name, training_step(model, optimizer, ids, modality, True, labels, fused)))
        else:
            from transformers import DeepseekV2ForCausalLM

            impl = "grouped_mm" if "grouped_mm" in kind else "eager"
            model = DeepseekV2ForCausalLM(hf_config(config, impl)).train()
            missing, unexpected = model.load_state_dict(to_hf_state_dict(reference), strict=False)
            if unexpected or [k for k in missing if "rotary" not in k]:
                raise RuntimeError(f"weight copy into transformers failed: missing {missing}, unexpected {unexpected}")
            fused = "fused" in kind
            attn = model.config._attn_implementation
            rows.append(Row(f"transformers DeepseekV2 ({impl} experts, {attn} attn"
                            + (", fused AdamW)" if fused else ")"),
                            training_step(model, their_optimizer(model, fused), ids, modality, False, labels)))
            theirs = theirs or model
    return rows, reference, theirs, data


def memory_row(args, kind: str) -> dict[str, float]:
    """Peak RSS growth (MiB) over the resident size during one training step (the second: optimizer state
    already allocated), for one row kind alone in this process."""
    rows, *_ = build_rows(args, [kind])
    rows[0].step()
    before = current_rss_mb()
    rows[0].step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(row=rows[0].name, before_mb=before, step_peak_delta_mb=peak - before)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt-fraction", type=float, default=0.0,
                        help="leading fraction of each row labelled -100 (no loss) for both models")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--retries", type=int, default=3, help="re-runs of a repetition disturbed by other processes")
    parser.add_argument("--wait-budget", type=float, default=300.0,
                        help="seconds to wait in all for a quiet machine before re-running disturbed repetitions")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="thread: CPU seconds of the calling thread (needs --threads 1), blind to other processes")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc settings alone (see bench_moe.keep_freed_memory)")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 2 x 64, 2 repetitions")
    parser.add_argument("--memory", action="store_true", help="peak RSS of one step per row, each in a subprocess")
    parser.add_argument("--memory-row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread's CPU time: use it with --threads 1")
    if args.quick:
        args.batch, args.seq_len, args.reps, args.retries = 2, 64, 2, 0
    torch.set_num_threads(args.threads)
    raw = sys.argv[1:] if argv is None else argv
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *raw])
    if args.memory_row:
        print(json.dumps(memory_row(args, args.memory_row)))
        return {}
    if args.memory:
        print(f"command: {command}\npeak RSS growth during one training step (each row alone in a subprocess):")
        for kind in ("ours", "ours-plain-loss", "theirs-eager"):
            out = subprocess.run([sys.executable, __file__, *raw, "--memory-row", kind], check=True,
                                 capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(f"  {result['row']:62s} +{result['step_peak_delta_mb']:7.1f} MiB "
                  f"(resident before the step: {result['before_mb']:.0f} MiB)")
        return {}

    kept = not args.default_malloc and keep_freed_memory()  # after the memory branches: it would hide peaks
    kinds = ["ours", "ours-modality_aware", "theirs-eager", "theirs-grouped_mm", "theirs-eager-fused"]
    rows, reference, theirs, data = build_rows(args, kinds)
    ids, modality, labels = data["ids"], data["modality"], data["labels"]

    # Same weights, same routing: the two models must agree on the loss before any timing means anything.
    with torch.no_grad():
        reference.eval(), theirs.eval()
        ours_loss = our_loss(reference, ids, labels, modality) - reference(ids, modality).aux_loss
        plain_loss = our_loss(reference, ids, labels, modality, fused=False) - reference(ids, modality).aux_loss
        their_loss = theirs(input_ids=ids, labels=labels).loss
        reference.train(), theirs.train()
    if not (torch.allclose(ours_loss, their_loss, rtol=1e-4) and torch.allclose(plain_loss, their_loss, rtol=1e-4)):
        raise RuntimeError(f"models disagree before timing: loss {ours_loss.item():.6f} (fused), "
                           f"{plain_loss.item():.6f} (plain) vs {their_loss.item():.6f}")
    c = reference.config
    print(f"command: {command}\ntorch {torch.__version__}, {torch.get_num_threads()} threads, fp32; preset "
          f"{args.preset}: hidden {c.hidden_size}, {c.num_layers} layers, {c.n_routed_experts} experts x "
          f"{c.moe_intermediate_size} top-{c.top_k}, {c.n_shared_experts} shared, vocab {c.vocab_size}; "
          f"batch {args.batch} x {args.seq_len}, supervised positions {int((labels[:, 1:] != -100).sum())} "
          f"of {labels[:, 1:].numel()}\ntransformers: attn_implementation={theirs.config._attn_implementation!r} "
          f"(its default), use_cache={theirs.config.use_cache} (its default); loss {their_loss.item():.6f}, ours "
          f"{ours_loss.item():.6f}; {malloc_note(kept)}")
    if args.clock == "thread":
        run_interleaved_thread_clock(rows, args.reps, quiet=args.quick)
    else:
        run_interleaved(rows, args.reps, retries=args.retries, wait_budget=args.wait_budget, quiet=args.quick)
    ratios = print_table("training step: forward + backward + AdamW", rows, rows[0].name,
                         note=f"ratios to our vanilla-router row; medians of {args.reps} interleaved repetitions"
                         + ("; CPU time of the compute thread" if args.clock == "thread" else "; wall time"))
    ours = statistics.median(rows[0].times)
    for row in rows[2:]:
        print(f"speed-up of {rows[0].name} over {row.name}: {statistics.median(row.times) / ours:.2f}x")
    return ratios


if __name__ == "__main__":
    main()
