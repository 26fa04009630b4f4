"""Greedy decoding with the KV cache for batches of left-padded prompts."""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, modality: torch.Tensor,
                    attention_mask: torch.Tensor | None, max_new_tokens: int, *, eos_id: int,
                    pad_id: int | None = None,
                    modality_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Return the new tokens [B, <= max_new_tokens]; a row that emitted eos is padded with pad_id after it.

    Prompts are LEFT-padded (attention_mask False on the padding). Positions count real tokens only, so a
    padded prompt is encoded exactly as the same prompt alone. ``modality_of`` marks each generated token
    (e.g. the tokenizer's unit tokens as audio); without it generated tokens are marked text.
    inputs_embeds [B, P, H]: the prompt's embeddings (e.g. with spliced audio frames) instead of its ids'.
    """
    pad_id = eos_id if pad_id is None else pad_id
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids, modality, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                    inputs_embeds=inputs_embeds)
        cache, next_pos = out.past_key_values, positions[:, -1:] + 1
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        generated = []
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            generated.append(torch.where(done, torch.full_like(token, pad_id), token))
            done |= token == eos_id
            if bool(done.all()):
                break
            step = token[:, None]  # finished rows keep decoding (their output is masked): pad_id may be no token
            step_modality = modality_of(step) if modality_of is not None else torch.zeros_like(step)
            attention_mask = torch.cat((attention_mask, torch.ones_like(step, dtype=torch.bool)), dim=1)
            out = model(step, step_modality, attention_mask=attention_mask, position_ids=next_pos,
                        past_key_values=cache, use_cache=True)
            next_pos = next_pos + 1
        if not generated:
            return input_ids.new_zeros(batch, 0)
        return torch.stack(generated, dim=1)
    finally:
        model.train(was_training)
