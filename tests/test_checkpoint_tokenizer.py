"""A MoST tokenizer built from a base tokenizer.json, and the embedding rows it needs on import."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hf_checkpoints import deepseek_model, save_hf
from most_lightning.model.checkpoint import load_pretrained
from most_lightning.model.checkpoint.init import resolve_model_init
from most_lightning.text import BaseTokenizerError, MoSTTokenizer

pytest.importorskip("transformers")

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"  # DeepSeek's spelling
TEXTS = ["the quick brown fox jumps over the lazy dog", "a speech and text mixture of experts",
         "modality aware routing sends audio tokens to audio experts"] * 20


def write_base_tokenizer(directory, vocab_size=200):
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    directory.mkdir(parents=True, exist_ok=True)
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": BOS}, "eos_token": EOS}))
    return tk.get_vocab_size()


def test_units_are_appended_after_the_base_and_marks_follow_the_ids(tmp_path):
    base_size = write_base_tokenizer(tmp_path / "base")
    tok = MoSTTokenizer.from_base(tmp_path / "base", n_units=12)
    assert tok.bos_id == 0 and tok.eos_id == 1  # the base's own specials, not new ones
    assert tok.vocab_size == base_size + 14
    assert sorted(tok.unit_ids.tolist() + [tok.boa_id, tok.eoa_id]) == list(range(base_size, base_size + 14))
    ids = torch.tensor([tok.bos_id, *tok.encode_text("audio experts"), *tok.encode_units([3, 11]), tok.eos_id])
    marks = tok.modality_of(ids)
    n_text = len(tok.encode_text("audio experts"))
    assert marks.tolist() == [0] * (1 + n_text) + [1, 1, 1, 1] + [0]
    assert tok.decode_text(ids) == "audio experts"


def test_missing_bos_eos_names_the_file(tmp_path):
    write_base_tokenizer(tmp_path / "base")
    (tmp_path / "base" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(BaseTokenizerError, match="tokenizer_config.json: no bos_token/eos_token"):
        MoSTTokenizer.from_base(tmp_path / "base")
    with pytest.raises(BaseTokenizerError, match="no tokenizer.json"):
        MoSTTokenizer.from_base(tmp_path / "nowhere")


def test_embedding_grows_only_by_the_new_rows_initialised_to_the_mean(tmp_path, single_thread):
    base_size = write_base_tokenizer(tmp_path / "ckpt")
    theirs = deepseek_model(vocab_size=base_size)
    save_hf(theirs, tmp_path / "ckpt")
    tok = MoSTTokenizer.from_base(tmp_path / "ckpt", n_units=12)
    base, _ = load_pretrained(tmp_path / "ckpt", progress=False)
    ours, report = load_pretrained(tmp_path / "ckpt", vocab_size=tok.vocab_size, progress=False)
    assert ours.config.vocab_size == tok.vocab_size == base_size + 14
    assert set(report.initialised_by_rule) == {"model.embed_tokens.weight", "lm_head.weight"}
    emb = ours.model.embed_tokens.weight
    assert torch.equal(emb[:base_size], base.model.embed_tokens.weight)
    torch.testing.assert_close(emb[base_size:], base.model.embed_tokens.weight.mean(0).expand(14, -1))
    ids = torch.tensor([[tok.bos_id, *tok.encode_text("the lazy dog")]])
    with torch.no_grad():
        old, new = base(ids).logits, ours(ids).logits
    assert torch.equal(new[..., :base_size], old)  # the base model's text predictions are untouched
    # a mean output row scores every new token at the average logit of the old ones
    torch.testing.assert_close(new[..., base_size:], old.mean(-1, keepdim=True).expand(-1, -1, 14))


def test_padded_checkpoint_vocab_needs_no_resize(tmp_path, single_thread):
    """As DeepSeek-V2-Lite (102400 rows for ~100k tokens): new tokens fit in the existing rows."""
    base_size = write_base_tokenizer(tmp_path / "ckpt")
    save_hf(deepseek_model(vocab_size=base_size + 50), tmp_path / "ckpt")
    tok = MoSTTokenizer.from_base(tmp_path / "ckpt", n_units=12)
    ours, report = load_pretrained(tmp_path / "ckpt", vocab_size=tok.vocab_size, progress=False)
    assert ours.config.vocab_size == base_size + 50 and report.initialised_by_rule == {}
    assert int(tok.unit_ids.max()) < ours.config.vocab_size
    group = {"preset": "tiny", "hidden_size": 256, "init": {"from_pretrained": str(tmp_path / "ckpt")}}
    resolved, vocab = resolve_model_init(group, tok.vocab_size)
    assert vocab == base_size + 50 and resolved["hidden_size"] == 64 and resolved["init"]["_resolved"]
    assert "preset" not in resolved
