"""Packed rows (data.batching=pack): every example in a row attends only within itself and its positions restart,
so a packed row computes exactly what its examples compute one by one (the oracle: each example run alone)."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES
from most_lightning.data.batching import FixedBatcher, PackBatcher
from most_lightning.data.tasks import IGNORE_INDEX, Example
from most_lightning.model.packing import segment_positions
from test_lit_module import make_module
from test_model_core import tiny


def test_positions_restart_at_every_example():
    segments = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert segment_positions(segments).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]]


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attention, router", [("mla", "vanilla"), ("gqa", "modality_aware")])
def test_packed_row_computes_what_its_examples_compute_alone(attention, router, device):
    """Logits per example, and the balance loss as the mean of the examples' own (the reference's per sequence)."""
    extra = dict(num_heads=4, num_kv_heads=2, head_dim=16) if attention == "gqa" else {}
    model = tiny(attention=attention, router={"name": router, "balance_loss_alpha": 0.1}, **extra).train().to(device)
    torch.manual_seed(1)
    rows = [(5, 7, 3), (9, 6), (17,)]  # two packed rows with padding after their last example, one full row
    ids = torch.zeros(len(rows), 17, dtype=torch.long)
    modality, segments = torch.zeros_like(ids), torch.zeros_like(ids)
    examples = []  # (row, start, ids, marks)
    for r, lengths in enumerate(rows):
        at = 0
        for j, n in enumerate(lengths):
            example, marks = torch.randint(0, 101, (n,)), torch.randint(0, 2, (n,))
            ids[r, at:at + n], modality[r, at:at + n], segments[r, at:at + n] = example, marks, j + 1
            examples.append((r, at, example.to(device), marks.to(device)))
            at += n
    ids, modality, segments = ids.to(device), modality.to(device), segments.to(device)
    # fp32 matmuls over a different number of rows may block their sums differently (CPU and GPU kernels vary
    # by shape): ~1e-5 apart here, far below the 1e-3 by which mixed examples differ (last assert)
    tol = dict(atol=5e-5, rtol=5e-5) if device == "cpu" else dict(atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        out = model(ids, modality, attention_mask=segments > 0, segment_ids=segments)
        balance_alone = []
        for r, at, example, marks in examples:
            alone = model(example[None], marks[None])
            torch.testing.assert_close(out.logits[r, at:at + len(example)], alone.logits[0], **tol)
            balance_alone.append(alone.aux_losses["balance"])
        unmasked = model(ids, modality, attention_mask=segments > 0).logits
    torch.testing.assert_close(out.aux_losses["balance"], torch.stack(balance_alone).mean(), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(unmasked[0, 5:12], out.logits[0, 5:12], atol=1e-3)  # without segments examples mix


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
@pytest.mark.parametrize("device", DEVICES)
def test_packed_row_gradients_are_the_sum_of_the_examples_gradients(device):
    torch.manual_seed(2)  # the weights too: the tolerance below holds for these, whatever ran before
    model = tiny(attention="mla", router={"name": "modality_aware"}).train().to(device)
    lengths = (6, 4, 5)
    examples = [torch.randint(0, 101, (n,)).to(device) for n in lengths]
    row = torch.cat(examples + [torch.zeros(2, dtype=torch.long, device=device)])[None]
    segments = torch.cat([torch.full((n,), j + 1) for j, n in enumerate(lengths)]
                         + [torch.zeros(2, dtype=torch.long)]).to(device)
    probe = torch.randn(sum(lengths), 101).to(device)  # a fixed linear function of the real tokens' logits
    # a packed row and the lone examples run matmuls of other shapes, so fp32 sums come in other orders (~2e-4 apart
    # at worst here); an example that saw another's tokens would be off by orders of magnitude more
    tol = dict(atol=5e-4, rtol=1e-3)

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    packed = model(row, torch.zeros_like(row), segment_ids=segments[None],
                   attention_mask=(segments > 0)[None]).logits[0, :sum(lengths)]
    expected = grads((packed * probe).sum())
    at, alone = 0, None
    for example in examples:
        g = grads((model(example[None], torch.zeros_like(example[None])).logits[0] * probe[at:at + len(example)]).sum())
        alone = g if alone is None else [a + b for a, b in zip(alone, g)]
        at += len(example)
    for got, want in zip(expected, alone):
        torch.testing.assert_close(got, want, **tol)


def make_examples(tok) -> list[Example]:
    t, u = tok.encode_text, tok.encode_units
    specs = [("asr", [tok.bos_id, *u([1, 2, 3]), tok.eos_id], [tok.bos_id, *t("abc"), tok.eos_id]),
             ("tts", [tok.bos_id, *t("cab"), tok.eos_id], [tok.bos_id, *u([4, 5, 6, 7]), tok.eos_id]),
             ("text", [], [tok.bos_id, *t("hello"), tok.eos_id]),
             ("asr", [tok.bos_id, *u([7, 1]), tok.eos_id], [tok.bos_id, *t("ba"), tok.eos_id])]
    examples = []
    for i, (task, prompt, response) in enumerate(specs):
        labels = [IGNORE_INDEX] * (len(prompt) + 1) + response[1:]  # the response's BOS is given, not predicted
        examples.append(Example(input_ids=prompt + response, labels=labels, task=task, key=f"ex{i}"))
    return examples


def test_packed_batch_trains_on_the_same_losses_as_padded_batch(toy_tokenizer):
    module = make_module(toy_tokenizer.vocab_size).eval()
    examples = make_examples(toy_tokenizer)
    batcher = FixedBatcher(len(examples), toy_tokenizer.pad_id, toy_tokenizer.modality_of)
    (padded,) = [batch for e in examples for batch in batcher.add(e)]
    packer = PackBatcher(24, 4, toy_tokenizer.pad_id, toy_tokenizer.modality_of)
    packed = [batch for e in examples for batch in packer.add(e)] + packer.flush()
    assert len(packed) == 1 and packed[0]["input_ids"].shape[0] < len(examples)  # rows really hold several
    with torch.no_grad():
        padded_losses = module(padded, compute_logits=False).token_losses
        packed_losses = module(packed[0], compute_logits=False).token_losses
    padded_sum, padded_count = padded_losses.sum_and_count()
    packed_sum, packed_count = packed_losses.sum_and_count()
    assert int(packed_count) == int(padded_count) > 0
    torch.testing.assert_close(packed_sum, padded_sum, atol=1e-4, rtol=1e-5)


def test_segment_ids_are_rejected_with_a_kv_cache_or_the_wrong_shape():
    model = tiny()
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        cache = model(ids, torch.zeros_like(ids), use_cache=True).past_key_values
        with pytest.raises(ValueError, match="KV cache"):
            model(ids[:, :1], torch.zeros_like(ids[:, :1]), segment_ids=torch.ones(1, 1, dtype=torch.long),
                  past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="segment_ids"):
            model(ids, torch.zeros_like(ids), segment_ids=torch.ones(1, 5, dtype=torch.long))
