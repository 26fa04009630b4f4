"""Max |logits difference| of imported / upcycled / exported models against transformers (fp32, CPU).

    python experiments/checkpoint_parity_errors.py

The same small random checkpoints as tests/test_checkpoint_*.py (written locally by transformers).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from hf_checkpoints import deepseek_model, llama_model, save_hf  # noqa: E402

from most_lightning.model.checkpoint import export_hf, load_pretrained, upcycle_pretrained  # noqa: E402


def max_error(theirs, ours, vocab, positions_from):
    ids = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(positions_from, positions_from + 40).expand(2, -1)
    with torch.no_grad():
        a = theirs(input_ids=ids, position_ids=positions).logits
        b = ours.eval()(ids, position_ids=positions).logits
    return float((a - b).abs().max()), float(a.abs().max())


def main() -> None:
    import transformers

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for layout in ("per_expert", "fused"):
            for q in (None, 24):
                theirs = deepseek_model(q_lora_rank=q)
                path = save_hf(theirs, tmp / f"ds-{layout}-{q}", layout)
                ours, _ = load_pretrained(path, progress=False)
                rows.append((f"import DeepSeek-V2, {layout} experts, q_lora_rank={q}", *max_error(theirs, ours, 97, 100)))
        ours, _ = load_pretrained(tmp / "ds-per_expert-24", progress=False)
        export_hf(ours, tmp / "export")
        theirs = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp / "export", attn_implementation="eager").eval()
        rows.append(("export -> transformers DeepseekV2ForCausalLM.from_pretrained", *max_error(theirs, ours, 97, 100)))
        designs = {
            "4 whole-FFN copies, renormalize": dict(moe_intermediate_size=128, n_shared_experts=0,
                                             router=dict(name="vanilla", renormalize=True)),
            "2 segments, shared + routed copies, modality_aware renorm": dict(
                moe_intermediate_size=64, n_shared_experts=1, router=dict(name="modality_aware", renormalize=True)),
            "copies, zero gate, routed_scaling E/k": dict(moe_intermediate_size=128, n_shared_experts=0,
                                                          router=dict(name="vanilla", routed_scaling_factor=2.0),
                                                          router_init="zeros"),
        }
        for tie in (False, True):
            theirs = llama_model(tie_word_embeddings=tie)
            theirs.save_pretrained(tmp / f"llama-{tie}")
            for name, design in designs.items():
                ours, _ = upcycle_pretrained(tmp / f"llama-{tie}", progress=False, n_routed_experts=4, top_k=2,
                                             first_k_dense_replace=0, **design)
                rows.append((f"upcycle Llama ({'tied' if tie else 'untied'}): {name}", *max_error(theirs, ours, 89, 20)))
    print("| case | max abs logits error | max abs logit |")
    print("|---|---|---|")
    for name, err, scale in rows:
        print(f"| {name} | {err:.2e} | {scale:.1f} |")


if __name__ == "__main__":
    main()
