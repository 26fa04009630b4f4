"""Task formatting by hand: which positions carry loss, modality marks, max-length policies, padding."""

import pytest
import torch

from most_lightning.data.collate import collate_asr_generation, collate_teacher_forced
from most_lightning.data.samples import OverlongSampleError
from most_lightning.data.tasks import ASR_INSTRUCTION, IGNORE_INDEX, TTS_INSTRUCTION, TaskFormatter
from most_lightning.text import MoSTTokenizer

TEXTS = ["the cat sat on the mat", "transcribe the following speech into text",
         "convert the following text into speech", "output"] * 20


@pytest.fixture(scope="module")
def tok() -> MoSTTokenizer:
    return MoSTTokenizer.train(TEXTS, vocab_size=300, n_units=20)


def test_asr_example_by_hand(tok):
    units, text = [3, 4, 5], "the cat"
    ex = TaskFormatter(tok).asr(units, text, key="k1")
    enc = tok.encode_text
    prompt = [tok.bos_id, *enc(ASR_INSTRUCTION + "\n\n"), tok.boa_id, *tok.unit_ids[units].tolist(), tok.eoa_id,
              tok.eos_id, *enc("\n\nOutput: ")]
    response = [tok.bos_id, *enc(text), tok.eos_id]
    assert ex.input_ids == prompt + response
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + response
    assert ex.task == "asr" and ex.key == "k1"
    assert tok.decode_text(ex.input_ids) == ASR_INSTRUCTION + "\n\n" + "\n\nOutput: " + text
    marks = tok.modality_of(torch.tensor(ex.input_ids)).tolist()
    start = prompt.index(tok.boa_id)
    assert marks == [0] * start + [1] * (len(units) + 2) + [0] * (len(ex) - start - len(units) - 2)


def test_tts_example_by_hand(tok):
    units, text = [7, 7, 1], "the mat"
    ex = TaskFormatter(tok).tts(text, units)
    prompt = [tok.bos_id, *tok.encode_text(TTS_INSTRUCTION + "\n\n"), *tok.encode_text(text), tok.eos_id,
              *tok.encode_text("\n\nOutput: ")]
    response = [tok.bos_id, *tok.encode_units(units), tok.eos_id]
    assert ex.input_ids == prompt + response
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + response
    loss_positions = [i for i, l in enumerate(ex.labels) if l != IGNORE_INDEX]
    assert loss_positions == list(range(len(prompt), len(ex)))
    marks = tok.modality_of(torch.tensor(ex.input_ids)).tolist()
    assert sum(marks) == len(units) + 2 and marks[len(prompt) + 1] == 1 and marks[-1] == 0


def test_text_lm_loss_on_all_but_bos(tok):
    ex = TaskFormatter(tok).text_lm("the cat sat")
    ids = tok.encode_text("the cat sat")
    assert ex.input_ids == [tok.bos_id, *ids, tok.eos_id]
    assert ex.labels == [IGNORE_INDEX, *ids, tok.eos_id]
    assert ex.task == "text"


def test_asr_generation_prompt_equals_the_teacher_forced_prompt(tok):
    fmt = TaskFormatter(tok)
    gen = fmt.asr_generation([1, 2], "the cat", key="k")
    tf = fmt.asr([1, 2], "the cat")
    n = len(gen.prompt_ids)
    assert tf.input_ids[:n] == gen.prompt_ids and tf.labels[n - 1] == IGNORE_INDEX and tf.labels[n] == tok.bos_id
    assert gen.reference_text == "the cat"


def test_max_length_drop_raises_overlong_and_truncate_counts(tok):
    long_units = list(range(20)) * 3
    drop = TaskFormatter(tok, max_length=40, max_length_policy="drop")
    with pytest.raises(OverlongSampleError, match="max_length 40"):
        drop.asr(long_units, "the cat", key="long_one")
    assert drop.text_lm("the cat").labels[0] == IGNORE_INDEX  # short ones pass
    trunc = TaskFormatter(tok, max_length=40, max_length_policy="truncate")
    ex = trunc.tts("the cat", long_units)
    assert len(ex.input_ids) == len(ex.labels) == 40 and ex.truncated and trunc.n_truncated == 1
    trunc.text_lm("the cat")
    assert trunc.n_truncated == 1
    gen = trunc.asr_generation(long_units, "ref")
    assert len(gen.prompt_ids) == 40 and gen.prompt_ids[-len(trunc._tail):] == trunc._tail
    with pytest.raises(ValueError, match="max_length_policy"):
        TaskFormatter(tok, max_length_policy="cut")


def test_teacher_forced_collate_right_pads(tok):
    fmt = TaskFormatter(tok)
    a, b = fmt.text_lm("the cat"), fmt.asr([1, 2, 3], "the mat")
    a.n_skipped = 2
    batch = collate_teacher_forced([a, b], tok.pad_id, tok.modality_of)
    T = len(b)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["modality"].shape == (2, T)
    assert batch["attention_mask"].dtype == torch.bool and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"][0].tolist() == [True] * len(a) + [False] * (T - len(a))
    assert (batch["input_ids"][0, len(a):] == tok.pad_id).all() and (batch["labels"][0, len(a):] == IGNORE_INDEX).all()
    assert (batch["modality"][0, len(a):] == 0).all()
    assert torch.equal(batch["modality"][1], tok.modality_of(torch.tensor(b.input_ids)))
    assert batch["task"] == ["text", "asr"] and batch["n_skipped"] == 2 and batch["n_truncated"] == 0


def test_generation_collate_left_pads(tok):
    fmt = TaskFormatter(tok)
    g1, g2 = fmt.asr_generation([1], "a", "k1"), fmt.asr_generation([1, 2, 3, 4], "b", "k2")
    batch = collate_asr_generation([g1, g2], tok.pad_id, tok.modality_of)
    P = len(g2.prompt_ids)
    pad = P - len(g1.prompt_ids)
    assert batch["prompt_ids"].shape == (2, P)
    assert batch["prompt_mask"][0].tolist() == [False] * pad + [True] * len(g1.prompt_ids)
    assert batch["prompt_ids"][0, pad:].tolist() == g1.prompt_ids and (batch["prompt_ids"][0, :pad] == tok.pad_id).all()
    assert batch["prompt_mask"][:, -1].all()
    assert batch["prompt_modality"][0, :pad].sum() == 0 and batch["prompt_modality"][1].sum() == 4 + 2
    assert batch["reference_text"] == ["a", "b"] and batch["key"] == ["k1", "k2"] and batch["n_skipped"] == 0
