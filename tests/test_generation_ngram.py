"""no_repeat_ngram_size in greedy decoding: which tokens are banned (by hand), and a model that would loop."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from most_lightning.model.generation import _ban_repeated_ngrams, greedy_generate


def test_banned_tokens_by_hand():
    logits = torch.zeros(2, 6)
    generated = torch.tensor([[1, 2, 3, 1, 2],    # prefix (1, 2) was followed by 3 -> 3 banned
                              [4, 5, 4, 5, 4]])   # prefix (5, 4) was followed by 5 -> 5 banned
    out = _ban_repeated_ngrams(logits, generated, 3)
    assert torch.isinf(out[0, 3]) and torch.isfinite(out[0, [0, 1, 2, 4, 5]]).all()
    assert torch.isinf(out[1, 5]) and torch.isfinite(out[1, :5]).all()
    assert torch.equal(_ban_repeated_ngrams(logits, generated[:, :1], 3), logits)  # too short to repeat
    assert torch.isinf(_ban_repeated_ngrams(logits, torch.tensor([[2, 2]]), 1)[0, 2])  # n=1: no token twice


class CyclingModel(torch.nn.Module):
    """Next-token logits that prefer (last + 1) mod 3 and give token 5 (the 'end') a lower score: greedy loops
    0 1 2 0 1 2 ... for ever; with repeated 3-grams banned it must leave the cycle."""

    def forward(self, ids, modality, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, inputs_embeds=None):
        last = ids[:, -1:]
        logits = torch.full((ids.shape[0], ids.shape[1], 6), -10.0)
        logits[:, -1].scatter_(1, (last + 1) % 3, 1.0)
        logits[:, -1, 5] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_a_cycling_model_stops_once_repeated_ngrams_are_banned():
    prompt = torch.tensor([[0]])
    looping = greedy_generate(CyclingModel(), prompt, torch.zeros_like(prompt), None, 12, eos_id=5)
    assert looping[0].tolist() == [1, 2, 0] * 4  # never the end token
    stopped = greedy_generate(CyclingModel(), prompt, torch.zeros_like(prompt), None, 12, eos_id=5,
                              no_repeat_ngram_size=3)
    # 1 2 0 1: the 3-gram (0 1 2) would repeat... (2 0 1) is new, then (0 1 2) repeats -> end token 5
    assert stopped[0].tolist()[-1] == 5 and len(stopped[0]) < 12
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be >= 0"):
        greedy_generate(CyclingModel(), prompt, torch.zeros_like(prompt), None, 4, eos_id=5, no_repeat_ngram_size=-1)
