"""Greedy and beam decoding with the KV cache for batches of left-padded prompts (token ids or embeddings)."""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, modality: torch.Tensor,
                    attention_mask: torch.Tensor | None, max_new_tokens: int, *, eos_id: int,
                    pad_id: int | None = None,
                    modality_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    inputs_embeds: torch.Tensor | None = None, no_repeat_ngram_size: int = 0) -> torch.Tensor:
    """Return the new tokens [B, <= max_new_tokens]; a row that emitted eos is padded with pad_id after it.

    Prompts are LEFT-padded (attention_mask False on the padding). Positions count real tokens only, so a
    padded prompt is encoded exactly as the same prompt alone. ``modality_of`` marks each generated token
    (e.g. the tokenizer's unit tokens as audio); without it generated tokens are marked text.
    inputs_embeds [B, P, H]: the prompt's embeddings (e.g. with spliced audio frames) instead of its ids'.
    no_repeat_ngram_size n > 0: a token that would repeat an n-gram already in the row's generated tokens is
    never chosen (breaks the short cycles greedy decoding of a weak model falls into; 0 = off).
    """
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {no_repeat_ngram_size}")
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
            logits = out.logits[:, -1]
            if no_repeat_ngram_size and generated:
                logits = _ban_repeated_ngrams(logits, torch.stack(generated, dim=1), no_repeat_ngram_size)
            token = logits.argmax(-1)
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


def _ban_repeated_ngrams(logits: torch.Tensor, generated: torch.Tensor, n: int) -> torch.Tensor:
    """logits [B, V] with -inf on every token that would complete an n-gram already in generated [B, L]."""
    if generated.shape[1] < n - 1 or n < 1:
        return logits
    logits = logits.clone()
    for row, seq in enumerate(generated.tolist()):
        prefix = tuple(seq[len(seq) - (n - 1):]) if n > 1 else ()
        banned = {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix}
        if banned:
            logits[row, list(banned)] = float("-inf")
    return logits


def _reorder_cache(cache, index: torch.Tensor) -> None:
    """Keep cache rows `index` (beam bookkeeping): every cached tensor is [B, ...]."""
    cache.layers = [None if t is None else tuple(x.index_select(0, index) for x in t) for t in cache.layers]


@torch.no_grad()
def beam_generate(model, input_ids: torch.Tensor, modality: torch.Tensor,
                  attention_mask: torch.Tensor | None, max_new_tokens: int, *, eos_id: int, beam_size: int = 4,
                  length_penalty: float = 1.0, pad_id: int | None = None,
                  modality_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Beam search with the KV cache; returns each prompt's best hypothesis [B, <= max_new_tokens] (eos kept,
    pad_id after it). Hypotheses are ranked by sum log p / length**length_penalty (finished ones by their
    length including eos). beam_size=1 gives exactly the greedy output.
    inputs_embeds [B, P, H]: the prompt's embeddings (e.g. with spliced audio frames) instead of its ids'."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    pad_id = eos_id if pad_id is None else pad_id
    batch, width = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.bool()
    expand = lambda t: t.repeat_interleave(beam_size, dim=0)  # noqa: E731  [B*W, ...], beams of a prompt adjacent
    ids, mods, mask = expand(input_ids), expand(modality), expand(attention_mask)
    embeds = None if inputs_embeds is None else expand(inputs_embeds)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    was_training = model.training
    model.eval()
    try:
        out = model(ids, mods, attention_mask=mask, position_ids=positions, use_cache=True, inputs_embeds=embeds)
        cache, next_pos = out.past_key_values, positions[:, -1:] + 1
        # only the first beam of each prompt is live at the start (the others are copies)
        scores = torch.full((batch, beam_size), float("-inf"), device=device)
        scores[:, 0] = 0.0
        tokens = torch.empty(batch * beam_size, 0, dtype=torch.long, device=device)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        vocab = out.logits.shape[-1]
        for step in range(max_new_tokens):
            logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1).view(batch, beam_size, vocab)
            total = (scores[:, :, None] + logp).view(batch, -1)
            top, flat = total.topk(2 * beam_size, dim=-1)  # room for beams that finish now
            new_scores = torch.full_like(scores, float("-inf"))
            new_rows, new_tokens = [], []
            for b in range(batch):
                kept = 0
                for rank, (value, index) in enumerate(zip(top[b].tolist(), flat[b].tolist())):
                    if value == float("-inf"):
                        break
                    beam, token = divmod(index, vocab)
                    row = b * beam_size + beam
                    if token == eos_id:
                        if rank < beam_size:  # as in HF: an eos ranked below the beam width does not finish
                            seq = tokens[row].tolist() + [eos_id]
                            finished[b].append((value / len(seq) ** length_penalty, seq))
                        continue
                    if kept < beam_size:
                        new_scores[b, kept] = value
                        new_rows.append(row)
                        new_tokens.append(token)
                        kept += 1
                while kept < beam_size:  # fewer live candidates than beams: dead copies
                    new_rows.append(b * beam_size)
                    new_tokens.append(pad_id)
                    kept += 1
            # stop a prompt once its best finished beam beats every live beam's best possible score
            done = all(len(finished[b]) >= beam_size or (
                finished[b] and max(f[0] for f in finished[b]) >= float(new_scores[b].max()) /
                (step + 2) ** length_penalty) for b in range(batch))
            if done or step == max_new_tokens - 1:
                for b in range(batch):
                    for k in range(beam_size):
                        if new_scores[b, k] > float("-inf"):
                            seq = tokens[new_rows[b * beam_size + k]].tolist() + [new_tokens[b * beam_size + k]]
                            finished[b].append((float(new_scores[b, k]) / len(seq) ** length_penalty, seq))
                break
            rows = torch.tensor(new_rows, device=device)
            step_tokens = torch.tensor(new_tokens, device=device)[:, None]
            tokens = torch.cat((tokens.index_select(0, rows), step_tokens), dim=1)
            scores = new_scores
            _reorder_cache(cache, rows)
            mask = torch.cat((mask.index_select(0, rows), torch.ones_like(step_tokens, dtype=torch.bool)), dim=1)
            step_modality = modality_of(step_tokens) if modality_of is not None else torch.zeros_like(step_tokens)
            out = model(step_tokens, step_modality, attention_mask=mask, position_ids=next_pos,
                        past_key_values=cache, use_cache=True)
            next_pos = next_pos + 1
        best = [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]
        length = max((len(s) for s in best), default=0)
        result = torch.full((batch, length), pad_id, dtype=torch.long, device=device)
        for b, seq in enumerate(best):
            result[b, : len(seq)] = torch.tensor(seq, dtype=torch.long, device=device)
        return result
    finally:
        model.train(was_training)
