"""A test set with missing audio / empty references: counted, excluded and reported (or raised, naming the
sample), by the data config's on_bad_sample policy; the suite does not crash."""

from __future__ import annotations

import pytest
import torch

from eval_fixtures import task_settings
from most_lightning.data import MoSTDataModule
from most_lightning.data.samples import BadSampleError
from most_lightning.data.testing import TINY_RECIPE, bad_variant, build_tiny_corpus, read_shard, write_shard
from most_lightning.eval.asr import evaluate_asr
from most_lightning.eval.context import EvalContext
from most_lightning.eval.tts import split_utterances

BROKEN = ("garbage_audio", "empty_transcript", "missing_transcript", "missing_units")


@pytest.fixture(scope="module")
def broken_test_split(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "most_data_corpus"
    build_tiny_corpus(root)
    dm = MoSTDataModule.from_settings(data_dir=str(root), corpus=TINY_RECIPE, progress=False, max_length=None)
    good = [s for shard in dm.shards("test") for s in read_shard(shard)]
    shard = write_shard(tmp_path_factory.mktemp("broken") / "test-broken.tar",
                        [*(bad_variant(good[0], k) for k in BROKEN), *good])
    return root, str(shard), len(good)


def _ctx(root, shard, policy, tmp_path):
    from most_lightning.model import MoSTConfig, MoSTForCausalLM

    dm = MoSTDataModule.from_settings(data_dir=str(root), corpus=TINY_RECIPE, progress=False, max_length=None,
                                      on_bad_sample=policy, verify_audio="full")
    dm.shards = lambda split, _orig=dm.shards: [shard] if split == "test" else _orig(split)
    torch.manual_seed(0)
    cfg = MoSTConfig.from_preset("tiny", vocab_size=dm.tokenizer.vocab_size, hidden_size=32, num_layers=2,
                                 num_heads=2, intermediate_size=64, moe_intermediate_size=16, kv_lora_rank=8,
                                 qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    return EvalContext(model=MoSTForCausalLM(cfg).eval(), tokenizer=dm.tokenizer, datamodule=dm, batch_size=4,
                       output_dir=tmp_path, progress=False)


def test_bad_test_samples_are_counted_excluded_and_reported(broken_test_split, tmp_path):
    root, shard, n_good = broken_test_split
    ctx = _ctx(root, shard, "skip", tmp_path)
    m = evaluate_asr(ctx, **task_settings("asr", decodings=["greedy"], max_new_tokens=4))["metrics"]
    assert m["n_skipped_samples"] == len(BROKEN) and m["n_utterances"] == n_good
    utts, skipped = split_utterances(ctx, "test")
    assert skipped == len(BROKEN) and len(utts) == n_good


def test_raise_policy_names_the_sample(broken_test_split, tmp_path):
    root, shard, _ = broken_test_split
    ctx = _ctx(root, shard, "raise", tmp_path)
    with pytest.raises(BadSampleError, match="garbage_audio"):
        evaluate_asr(ctx, **task_settings("asr", decodings=["greedy"], max_new_tokens=4))
