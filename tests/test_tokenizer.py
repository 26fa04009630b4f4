"""MoSTTokenizer: text/unit round trips, modality marks from the real ids, missing-special-token errors."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from most_lightning.text import MissingSpecialTokensError, MoSTTokenizer, SpecialTokens

TEXTS = ["the cat sat on the mat", "he played bach on the organ", "a scene of unusual beauty",
         "water flowed into the cave", "national elections were held"] * 20


@pytest.fixture(scope="module")
def tok() -> MoSTTokenizer:
    return MoSTTokenizer.train(TEXTS, vocab_size=300, n_units=50)


def test_ids_and_vocab_size_come_from_the_vocabulary(tok):
    sp = tok.specials
    t = tok.tokenizer
    assert tok.vocab_size == t.get_vocab_size(with_added_tokens=True) == 300 + 2 + 50
    assert (tok.bos_id, tok.eos_id, tok.boa_id, tok.eoa_id) == tuple(
        t.token_to_id(x) for x in (sp.bos, sp.eos, sp.boa, sp.eoa))
    assert tok.pad_id == tok.eos_id
    assert tok.unit_ids.tolist() == [t.token_to_id(f"[Hu{i}]") for i in range(50)]
    assert len({tok.bos_id, tok.eos_id, tok.boa_id, tok.eoa_id, *tok.unit_ids.tolist()}) == 54


def test_text_round_trip(tok):
    for text in ["the cat sat on the mat", "Unseen words: zebra quokka!", "  spaces  and\nnewlines "]:
        ids = tok.encode_text(text)
        assert tok.decode_text(ids) == text
    assert tok.encode_text("") == []


def test_text_never_turns_into_special_or_unit_tokens(tok):
    ids = tok.encode_text("[Hu3] <|begin_of_audio|> <|end_of_text|>")
    assert not any(i in tok.unit_ids.tolist() or i in (tok.boa_id, tok.eoa_id, tok.eos_id) for i in ids)
    assert tok.decode_text(ids) == "[Hu3] <|begin_of_audio|> <|end_of_text|>"


def test_unit_round_trip_and_decode_text_drops_non_text(tok):
    units = [0, 7, 7, 49, 3]
    ids = tok.encode_units(units)
    assert ids[0] == tok.boa_id and ids[-1] == tok.eoa_id and len(ids) == len(units) + 2
    assert tok.decode_units(ids) == units
    mixed = [tok.bos_id, *tok.encode_text("the cat"), *ids, tok.eos_id, tok.vocab_size + 5]
    assert tok.decode_text(mixed) == "the cat"
    assert tok.decode_units(mixed) == units
    assert tok.decode_units(torch.tensor(mixed)) == units
    with pytest.raises(ValueError, match="unit 50 is outside"):
        tok.encode_units([1, 50])


def test_modality_marks_follow_the_assigned_ids(tok):
    text = tok.encode_text("the cat")
    ids = torch.tensor([[tok.bos_id, *text, *tok.encode_units([1, 2]), tok.eos_id, tok.pad_id, tok.vocab_size, -100]])
    expected = [0] + [0] * len(text) + [1, 1, 1, 1] + [0, 0, 0, 0]
    assert tok.modality_of(ids).tolist() == [expected]
    every = torch.arange(tok.vocab_size)
    audio = set(tok.unit_ids.tolist()) | {tok.boa_id, tok.eoa_id}
    assert tok.modality_of(every).tolist() == [int(i in audio) for i in range(tok.vocab_size)]


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "tok")
    loaded = MoSTTokenizer.load(tmp_path / "tok")
    assert loaded.vocab_size == tok.vocab_size and torch.equal(loaded.unit_ids, tok.unit_ids)
    assert loaded.encode_text("a scene of beauty") == tok.encode_text("a scene of beauty")
    assert (loaded.bos_id, loaded.eos_id, loaded.boa_id, loaded.eoa_id) == (tok.bos_id, tok.eos_id, tok.boa_id, tok.eoa_id)


def _plain_text_tokenizer() -> Tokenizer:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=280, special_tokens=["<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    return t


def test_loading_a_plain_text_tokenizer_says_how_to_add_the_audio_tokens(tmp_path):
    _plain_text_tokenizer().save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(MissingSpecialTokensError, match="from_text_tokenizer"):
        MoSTTokenizer.load(tmp_path)


def test_missing_tokens_are_listed(tmp_path):
    plain = _plain_text_tokenizer()
    plain.add_special_tokens(["<|begin_of_audio|>"])  # eoa and units missing
    plain.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "most_tokenizer.json").write_text(json.dumps(
        {"n_units": 4, "bos": "<s>", "eos": "</s>", "boa": "<|begin_of_audio|>", "eoa": "<|end_of_audio|>",
         "unit_format": "[Hu{}]"}))
    with pytest.raises(MissingSpecialTokensError) as err:
        MoSTTokenizer.load(tmp_path)
    message = str(err.value)
    assert "<|end_of_audio|>" in message and "[Hu0]" in message and "[Hu3]" in message
    assert "<|begin_of_audio|>" not in message.split("Build")[0]
    assert "from_text_tokenizer" in message


def test_from_text_tokenizer_adds_missing_tokens_wherever_ids_fall():
    plain = _plain_text_tokenizer()
    plain.add_special_tokens(["[Hu2]"])  # one unit token already present, out of order: no contiguous range
    tok = MoSTTokenizer.from_text_tokenizer(plain, bos_token="<s>", eos_token="</s>", n_units=4)
    assert tok.bos_id == plain.token_to_id("<s>") and tok.eos_id == plain.token_to_id("</s>")
    unit_ids = tok.unit_ids.tolist()
    assert unit_ids[2] < unit_ids[0]  # [Hu2] came first
    assert tok.decode_units(tok.encode_units([0, 1, 2, 3])) == [0, 1, 2, 3]
    marks = tok.modality_of(torch.tensor(unit_ids + [tok.boa_id, tok.eoa_id, tok.bos_id]))
    assert marks.tolist() == [1] * 6 + [0]


def test_custom_special_token_spelling_round_trips(tmp_path):
    sp = SpecialTokens(bos="<bos>", eos="<eos>", boa="<boa>", eoa="<eoa>", unit_format="<|unit_{}|>")
    tok = MoSTTokenizer.train(TEXTS, vocab_size=280, n_units=3, specials=sp)
    tok.save(tmp_path)
    loaded = MoSTTokenizer.load(tmp_path)
    assert loaded.tokenizer.id_to_token(loaded.unit_ids[1].item()) == "<|unit_1|>"
    assert loaded.tokenizer.id_to_token(loaded.bos_id) == "<bos>"
