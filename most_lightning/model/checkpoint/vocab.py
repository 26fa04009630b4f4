"""Vocabulary rows on import: the checkpoint's rows are copied, rows for tokens the base never had are
initialised by a rule, and the model is never smaller than the checkpoint (no row is dropped).

New rows (the MoST unit tokens and audio markers appended to a base tokenizer) are initialised, by default,
to the MEAN of the checkpoint's rows, for the input embedding and for the LM head alike (Hewitt, "Initializing
New Word Embeddings for Pretrained Language Models", 2021): a new output row with the mean of the old ones
gives each new token a logit equal to the average logit, so the pretrained model's distribution over the old
tokens barely moves (new tokens start near-improbable) and the input side starts at an "average token" rather
than a random vector of unrelated scale. ``normal`` draws N(0, initializer_range^2) instead, as from scratch.
"""

from __future__ import annotations

import torch

from most_lightning.model.checkpoint.files import CheckpointError
from most_lightning.model.checkpoint.loader import Assign, LoadPlan

NEW_ROW_RULES = ("mean", "normal")


def plan_vocab_rows(plan: LoadPlan, key: str, target: str, ckpt_shape: tuple[int, ...], model_rows: int,
                    rule: str, std: float) -> None:
    """Load checkpoint ``key`` [V_ckpt, H] into the first V_ckpt rows of ``target`` [model_rows, H]."""
    if rule not in NEW_ROW_RULES:
        raise CheckpointError(f"model.init.new_token_rows={rule!r}: allowed values are {list(NEW_ROW_RULES)}")
    n_ckpt = ckpt_shape[0]
    if model_rows < n_ckpt:
        raise CheckpointError(
            f"{key}: the checkpoint has {n_ckpt} vocabulary rows but the model only {model_rows}; rows would be "
            "dropped. Give the model at least the checkpoint's vocabulary (build the MoST tokenizer from the base "
            "model's tokenizer.json with MoSTTokenizer.from_text_tokenizer, which appends tokens after it)")
    if model_rows == n_ckpt:
        plan.add(key, ckpt_shape, Assign(target))
        return
    plan.add(key, ckpt_shape, Assign(target, rows=torch.arange(n_ckpt)))
    new = torch.arange(n_ckpt, model_rows)
    plan.by_rule[target] = (new, f"rows {n_ckpt}..{model_rows - 1} (tokens new to the checkpoint): {rule}")

    def init_rows(tensors: dict[str, torch.Tensor]) -> None:
        weight = tensors[target]
        if rule == "mean":
            weight[n_ckpt:] = weight[:n_ckpt].float().mean(0).to(weight.dtype)
        else:
            torch.nn.init.normal_(weight[n_ckpt:], std=std)

    plan.rules.append(init_rows)
    plan.notes.append(f"{target}: {model_rows - n_ckpt} new rows after the checkpoint's {n_ckpt}, initialised: {rule}")
