"""The general data pipeline: named sources, tasks (speech LM, chat), splitting, modes, batching, resume, bad input."""

from __future__ import annotations

import collections
import io
import json
import logging
import random
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from most_lightning.data.chat import decode_chat_sample
from most_lightning.data.datamodule import MoSTDataModule
from most_lightning.data.pipeline import FRESH, ShardCursor, SourceMixStream, TooFewShardsError
from most_lightning.data.samples import (BadChatError, BadSamplePolicy, TranscriptEncodingError, CorruptShardError, EmptyTranscriptError, EmptyTurnError,
                                         MissingMemberError, NotMonoAudioError, UndecodableAudioError,
                                         WrongSampleRateError)
from most_lightning.data.sources import parse_sources, resolve_shards
from most_lightning.data.tasks import IGNORE_INDEX, TaskFormatter
from most_lightning.data.testing import (TINY_RECIPE, bad_variant, build_tiny_corpus, chat_sample, read_shard,
                                         units_npy, write_shard)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "most_data_corpus"  # same cache as test_datamodule.py: built once
    build_tiny_corpus(root)
    return root


@pytest.fixture(scope="session")
def dm(data_root):
    dm = MoSTDataModule.from_settings(data_dir=str(data_root), corpus=TINY_RECIPE, progress=False, batch_size=4,
                                      max_length=None)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """Speech-schema shards without audio (verify_audio='none'): 12 shards of uneven sizes, 90 samples; and 3
    text shards. Keys say which shard and position they come from."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = random.Random(0)
    sizes = [4, 11, 6, 9, 3, 10, 8, 5, 12, 7, 6, 9]
    for j, n in enumerate(sizes):
        write_shard(root / f"speech-{j:03d}.tar", [
            {"__key__": f"s{j:03d}_{i:02d}", "txt": f"sentence {j} {i}".encode(),
             "units.npy": units_npy([rng.randrange(32) for _ in range(rng.randrange(3, 30))])} for i in range(n)])
    for j in range(3):
        write_shard(root / f"text-{j:03d}.tar", [{"__key__": f"t{j}_{i:02d}", "txt": f"text {j} {i}".encode()}
                                                 for i in range(10)])
    return root


def speech_keys(root):
    return {s["__key__"] for p in sorted(root.glob("speech-*.tar")) for s in read_shard(p)}


def make_stream(dm, sources, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("verify_audio", "none")
    kw.setdefault("batches_per_epoch", 10)
    return SourceMixStream(parse_sources(sources), dm.tokenizer, **kw)


# ---------------------------------------------------------------------------------------------- sources
def test_sources_resolve_globs_braces_directories_and_name_the_culprit(synthetic, tmp_path):
    all_speech = sorted(str(p) for p in synthetic.glob("speech-*.tar"))
    assert resolve_shards("speech-*.tar", synthetic) == all_speech
    assert resolve_shards("speech-{000..002}.tar", synthetic) == all_speech[:3]
    assert resolve_shards([str(synthetic / "speech-001.tar"), "speech-00{1,2}.tar"], synthetic) == all_speech[1:3]
    (tmp_path / "d").mkdir()
    write_shard(tmp_path / "d" / "x.tar", [{"__key__": "a", "txt": b"x"}])
    assert resolve_shards(str(tmp_path / "d")) == [str(tmp_path / "d" / "x.tar")]
    with pytest.raises(FileNotFoundError, match="'libri'.*nothing-\\*.tar.*data.sources.libri.shards"):
        parse_sources({"libri": {"shards": "nothing-*.tar", "tasks": {"asr": 1}}}, synthetic)
    with pytest.raises(ValueError, match="unknown task.*'chat'"):
        parse_sources({"x": {"shards": "speech-*.tar", "tasks": {"chat": 1}}}, synthetic)
    with pytest.raises(ValueError, match="mixes record kinds"):
        parse_sources({"x": {"shards": "speech-*.tar", "tasks": {"asr": 1, "text": 1}}}, synthetic)
    with pytest.raises(ValueError, match="shards: <paths/globs>"):
        parse_sources({"x": {"tasks": {"asr": 1}}}, synthetic)
    specs = parse_sources({"a": {"shards": "speech-*.tar", "tasks": {"asr": 0.0}},
                           "b": {"shards": "text-*.tar", "tasks": {"text": 1}}}, synthetic)
    assert [s.name for s in specs] == ["b"]  # a zero-weight source is switched off


# ---------------------------------------------------------------------------------------------- mixing
def test_mixing_weights_are_reproduced_over_many_samples(dm, synthetic):
    weights = {"asr": 0.4, "tts": 0.3, "speech_lm": 0.1, "text": 0.2}
    sources = {"speech": {"shards": str(synthetic / "speech-*.tar"), "tasks": {k: weights[k] for k in ("asr", "tts", "speech_lm")}},
               "text": {"shards": str(synthetic / "text-*.tar"), "tasks": {"text": weights["text"]}}}
    stream = make_stream(dm, sources, batches_per_epoch=500, batch_size=8, shuffle_buffer=20)
    counts = collections.Counter(t for b in stream for t in b["task"])
    n = sum(counts.values())
    assert n == 4000
    for task, p in weights.items():  # 4 binomial standard deviations
        assert abs(counts[task] / n - p) < 4 * (p * (1 - p) / n) ** 0.5, counts


# ---------------------------------------------------------------------------------------------- tasks
def test_speech_lm_and_chat_formats_with_loss_only_on_assistant_turns(dm, tmp_path):
    tok = dm.tokenizer
    fmt = TaskFormatter(tok)
    ex = fmt.speech_lm([3, 4, 5], "k")
    assert ex.input_ids == [tok.bos_id, tok.boa_id, *tok.unit_ids[[3, 4, 5]].tolist(), tok.eoa_id, tok.eos_id]
    assert ex.labels == [IGNORE_INDEX] + ex.input_ids[1:]
    units = [1, 1, 2, 7, 7, 7, 0]
    sample = chat_sample("c1", [{"role": "system", "text": "be brief"},
                                {"role": "user", "text": "hello there", "units": units},
                                {"role": "assistant", "text": "hi"},
                                {"role": "user", "text": "and now"},
                                {"role": "assistant", "text": "bye now", "units": [5, 5, 6]}])
    rec = decode_chat_sample(dict(sample, __url__="x.tar"), tok.n_units)
    assert rec.turns[1].units == [1, 2, 7, 0]  # deduplicated, as the LM sees units
    enc = tok.encode_text
    for speech in (False, True):
        ex = fmt.chat(rec, speech=speech)
        user1 = tok.encode_units([1, 2, 7, 0]) if speech else enc("hello there")
        last = tok.encode_units([5, 6]) if speech else enc("bye now")
        expected = ([tok.bos_id] + enc("be brief") + enc("\n\n") + enc("User: ") + user1 + enc("\n\n")
                    + enc("Assistant: ") + enc("hi") + [tok.eos_id] + enc("\n\n") + enc("User: ") + enc("and now")
                    + enc("\n\n") + enc("Assistant: ") + last + [tok.eos_id])
        assert ex.input_ids == expected and ex.task == ("speech_chat" if speech else "text_chat")
        learned = [lab for lab in ex.labels if lab != IGNORE_INDEX]
        assert learned == enc("hi") + [tok.eos_id] + last + [tok.eos_id]
        assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(ex.labels, ex.input_ids))
    text_only = decode_chat_sample(dict(chat_sample("c2", [{"role": "user", "text": "a"},
                                                           {"role": "assistant", "text": "b"}]), __url__="x"), 32)
    with pytest.raises(BadChatError, match="voiced turn"):
        fmt.chat(text_only, speech=True)


# ---------------------------------------------------------------------------------------------- splitting
def exact_pairs(stream, rank, world, worker, n_workers):
    """(key, task) of one reader's exact pass, as if it were worker `worker` of `n_workers` on rank `rank`."""
    stream.rank, stream.world_size = rank, world
    return [kt for b in stream._exact_pass(worker, n_workers) for kt in zip(b["key"], b["task"])]


@pytest.mark.parametrize("world,n_workers", [(1, 1), (2, 2), (3, 2), (4, 4), (2, 8)])
def test_exact_pass_is_disjoint_and_complete_for_any_ranks_x_workers(dm, synthetic, world, n_workers):
    # 12 shards: (4, 4) and (2, 8) have more readers than shards -> sample-level striding
    stream = make_stream(dm, {"s": {"shards": str(synthetic / "speech-*.tar"), "tasks": {"asr": 1, "tts": 1}}},
                         mode="exact", batches_per_epoch=None, batch_size=5)
    got = [kt for r in range(world) for w in range(n_workers) for kt in exact_pairs(stream, r, world, w, n_workers)]
    assert len(got) == len(set(got)) == 2 * 90
    assert {k for k, _ in got} == speech_keys(synthetic)


def test_exact_pass_through_real_dataloader_workers(dm, synthetic):
    dm2 = MoSTDataModule.from_settings(data_dir=str(dm.data_dir), corpus=TINY_RECIPE, progress=False, batch_size=4,
                                       max_length=None, verify_audio="none", num_workers=2)
    keys = [k for b in dm2.exact_pass_dataloader({"s": {"shards": str(synthetic / "speech-*.tar"),
                                                        "tasks": {"speech_lm": 1}}}) for k in b["key"]]
    assert sorted(keys) == sorted(speech_keys(synthetic))


def test_too_few_shards_error_or_stride_and_never_a_hang(dm, synthetic, tmp_path):
    src = {"t": {"shards": str(synthetic / "text-*.tar"), "tasks": {"text": 1}}}  # 3 shards
    spec = parse_sources(src)[0]
    with pytest.raises(TooFewShardsError, match="3 shard.*2 rank.*x 2 worker.*= 4 readers"):
        ShardCursor(spec, "resampled", 0, 0, 2, 0, 2, few_shards="error")
    # stride fallback in resampled mode: readers keep disjoint samples of the same shard order
    for n_pass in range(3):  # each pass: disjoint readers whose union is every sample
        seen = []
        for slot in range(4):
            c = ShardCursor(spec, "resampled", 0, slot // 2, 2, slot % 2, 2, position={**FRESH, "pass": n_pass})
            it, keys = c.samples(BadSamplePolicy()), []
            while (key := next(it)["__key__"]) and c.position["pass"] == n_pass:
                keys.append(key)
            seen.append(keys)
        assert sorted(k for keys in seen for k in keys) == sorted(f"t{j}_{i:02d}" for j in range(3) for i in range(10))
    # a reader that can never get a sample raises instead of spinning forever
    one = write_shard(tmp_path / "single.tar", [{"__key__": "only", "txt": b"one sample"}])
    stream = make_stream(dm, {"t": {"shards": str(one), "tasks": {"text": 1}}}, rank=1, world_size=2)
    with pytest.raises(RuntimeError, match="gave no sample.*keeps 1 raw sample in 2"):
        next(iter(stream))


# ---------------------------------------------------------------------------------------------- batching
def test_bucketed_batches_respect_the_token_budget_and_lose_nothing(dm, synthetic):
    src = {"s": {"shards": str(synthetic / "speech-*.tar"), "tasks": {"asr": 1, "tts": 1}}}
    fixed = list(make_stream(dm, src, mode="exact", batches_per_epoch=None, batch_size=8))
    bucket = list(make_stream(dm, src, mode="exact", batches_per_epoch=None, batching="bucket", max_tokens=400,
                              bucket_pool=40))
    assert all(b["input_ids"].numel() <= 400 for b in bucket)
    assert sorted(zip((k for b in fixed for k in b["key"]), (t for b in fixed for t in b["task"]))) == \
        sorted(zip((k for b in bucket for k in b["key"]), (t for b in bucket for t in b["task"])))

    def pad_fraction(batches):
        return 1 - sum(b["attention_mask"].sum().item() for b in batches) / sum(b["input_ids"].numel() for b in batches)

    assert pad_fraction(bucket) < pad_fraction(fixed) / 2
    with pytest.raises(ValueError, match="needs data.max_tokens"):
        make_stream(dm, src, batching="bucket")


def test_packed_rows_concatenate_whole_examples(dm, synthetic):
    src = {"s": {"shards": str(synthetic / "speech-*.tar"), "tasks": {"speech_lm": 1}}}
    plain = {k: (ids, labels) for b in make_stream(dm, src, mode="exact", batches_per_epoch=None, batch_size=1)
             for k, ids, labels in zip(b["key"], b["input_ids"].tolist(), b["labels"].tolist())}
    packed = list(make_stream(dm, src, mode="exact", batches_per_epoch=None, batching="pack", max_length=64,
                              max_tokens=256))
    keys = iter(k for b in packed for k in b["key"])
    for b in packed:
        assert b["input_ids"].shape[0] <= 4 and b["input_ids"].shape[1] <= 64
        for row in range(b["input_ids"].shape[0]):
            seg = b["segment_ids"][row]
            for s in range(1, int(seg.max()) + 1):
                ids, labels = plain[next(keys)]
                cols = (seg == s).nonzero().flatten()
                assert b["input_ids"][row, cols].tolist() == ids and b["labels"][row, cols].tolist() == labels
    assert next(keys, None) is None
    with pytest.raises(ValueError, match="max_length.*<= data.max_tokens"):
        make_stream(dm, src, batching="pack", max_tokens=32, max_length=64)


def test_max_length_drops_with_a_count_or_truncates(dm, synthetic):
    src = {"s": {"shards": str(synthetic / "speech-*.tar"), "tasks": {"speech_lm": 1}}}
    lengths = [b["attention_mask"][0].sum().item()
               for b in make_stream(dm, src, mode="exact", batches_per_epoch=None, batch_size=1)]
    n_long = sum(n > 20 for n in lengths)
    assert 0 < n_long < len(lengths)
    drop = list(make_stream(dm, src, mode="exact", batches_per_epoch=None, max_length=20))
    assert sum(len(b["key"]) for b in drop) == len(lengths) - n_long
    assert sum(b["n_skipped_by_reason"].get("overlong_sample", 0) for b in drop) == n_long
    cut = list(make_stream(dm, src, mode="exact", batches_per_epoch=None, max_length=20, max_length_policy="truncate"))
    assert sum(b["n_truncated"] for b in cut) == n_long and max(b["input_ids"].shape[1] for b in cut) == 20


# ---------------------------------------------------------------------------------------------- resume
def read_order(stream, source_name, n_pass=0):
    cursor = ShardCursor(next(s for s in stream.sources if s.name == source_name), stream.mode, stream.seed, 0, 1, 0, 1)
    return [s["__key__"] for shard in cursor.order(n_pass) for s in read_shard(shard)]


@pytest.mark.parametrize("buffer", [0, 8])
def test_resume_continues_the_uninterrupted_stream_exactly(dm, synthetic, buffer):
    """The saved head is where the current shuffle block began: the block is read again (at most `buffer`
    samples) and what it handed out is passed over, so nothing repeats and nothing is lost."""
    src = {"s": {"shards": str(synthetic / "speech-*.tar"), "tasks": {"speech_lm": 1}}}
    kw = dict(mode="split", batches_per_epoch=100, shuffle_buffer=buffer, batch_size=4, seed=5)
    reference = [k for b in make_stream(dm, src, **kw) for k in b["key"]]

    before_stream = make_stream(dm, src, **kw)
    before, state = [], None
    for i, b in enumerate(before_stream):
        before += b["key"]
        state = b["data_state"]
        if i == 6:  # "checkpoint" after 7 batches = 28 samples
            break
    assert before == reference[:28]  # same seed, same stream
    saved = {"world_size": 1, "num_workers": 1, "ranks": {"0": {"0": state["state"]}}}
    head = state["state"]["sources"]["s"]
    assert head["pass"] == 0 and 28 - max(buffer, 1) <= head["index"] <= 28  # the block's start
    after = [k for b in make_stream(dm, src, resume_state=saved, **kw) for k in b["key"]][:40]  # stays in pass 0
    order = read_order(before_stream, "s")
    assert len(order) == 90
    assert after == reference[28:68]  # the resumed stream IS the uninterrupted one
    assert set(before) | set(after) <= set(order[:68 + buffer])
    with pytest.raises(ValueError, match="1 rank.*x 1 worker.*2 x 1.*resume_data_position=false"):
        next(iter(make_stream(dm, src, resume_state=saved, world_size=2, **kw)))


def test_datamodule_state_follows_consumed_batches_across_workers(data_root, synthetic):
    src = {"s": {"shards": str(synthetic / "speech-*.tar"), "tasks": {"speech_lm": 1}}}
    kw = dict(data_dir=str(data_root), corpus=TINY_RECIPE, progress=False, batch_size=3, max_length=None,
              verify_audio="none", sources=src, shard_sampling="split", batches_per_epoch=8, shuffle_buffer=4,
              num_workers=2)
    first = MoSTDataModule.from_settings(**kw)
    seen_before = []
    for i, b in enumerate(first.train_dataloader()):
        seen_before += b["key"]
        first.on_before_batch_transfer(b, 0)  # what Lightning does right before each training step
        if i == 4:
            break
    state = first.state_dict()
    assert state["num_workers"] == 2 and state["ranks"]["0"]["0"]["batches"] == 3 and state["ranks"]["0"]["1"]["batches"] == 2
    second = MoSTDataModule.from_settings(**kw)
    second.load_state_dict(json.loads(json.dumps(state)))  # survives a plain (weights_only) checkpoint
    loader = second.train_dataloader()
    rest_of_epoch = [k for b in loader for k in b["key"]]
    next_epoch = [k for b in loader for k in b["key"]]
    assert len(rest_of_epoch) == 3 * 3 and len(next_epoch) == 8 * 3  # 5 of 8 batches were consumed before
    after = rest_of_epoch + next_epoch
    assert len(set(after)) == len(after) and not set(after) & set(seen_before)


@pytest.mark.slow
def test_lightning_checkpoint_restores_the_data_position(data_root, tmp_path, single_thread):
    import lightning as L

    from conftest import FAST_OVERRIDES, compose_run_config
    from hydra.utils import instantiate
    from omegaconf import open_dict

    cfg = compose_run_config([*FAST_OVERRIDES, "experiment=stage1_asr_tts", f"paths.data_dir={data_root}",
                              "trainer.accumulate_grad_batches=1", "lit.optimizer.lr=1e-3", "data.max_length=null"],
                             tmp_path)
    module = None
    batch_indices = []

    class RecordBatchIndex(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batch_indices.append(batch_idx)

    def fit(max_steps, ckpt=None):
        nonlocal module
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        module = instantiate(cfg.lit, model=cfg.model, router=cfg.router, vocab_size=datamodule.tokenizer.vocab_size,
                             _convert_="partial")
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, limit_val_batches=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
                            callbacks=[RecordBatchIndex()])
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        return trainer, datamodule

    with open_dict(cfg):
        cfg.data.batches_per_epoch = 4  # the checkpoint falls mid-epoch, the resumed run crosses an epoch end
    trainer, dm1 = fit(3)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=True)["MoSTDataModule"]
    assert saved["ranks"]["0"]["0"]["batches"] == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, dm2 = fit(7, tmp_path / "mid.ckpt")
    assert not [w for w in caught if "dataloader is not resumable" in str(w.message)]
    assert dm2.state_dict()["ranks"]["0"]["0"]["batches"] == 7  # continued at batch 4, not restarted at 1
    # the stream ends the interrupted epoch after its remaining batch, as Lightning's loop expects
    assert batch_indices == [0, 1, 2, 3, 0, 1, 2] and trainer.global_step == 7


# ---------------------------------------------------------------------------------------------- bad input
def _stereo(flac: bytes) -> bytes:
    wave, rate = sf.read(io.BytesIO(flac), dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, np.stack([wave, wave], axis=1), rate, format="FLAC")
    return buf.getvalue()


BAD_SPEECH = {  # kind -> (make the bad sample, error class, reason counter)
    "garbage_flac": (lambda s: bad_variant(s, "garbage_audio"), UndecodableAudioError, "undecodable_audio"),
    "missing_audio": (lambda s: {k: v for k, v in s.items() if k != "flac"} | {"__key__": s["__key__"] + "_noaudio"},
                      MissingMemberError, "missing_member"),
    "empty_transcript": (lambda s: bad_variant(s, "empty_transcript"), EmptyTranscriptError, "empty_transcript"),
    "non_utf8_transcript": (lambda s: dict(s, txt=b"caf\xe9 \xff", __key__=s["__key__"] + "_latin1"),
                            TranscriptEncodingError, "transcript_encoding"),
    "wrong_sample_rate": (lambda s: bad_variant(s, "wrong_sample_rate"), WrongSampleRateError, "wrong_sample_rate"),
    "stereo": (lambda s: dict(s, flac=_stereo(s["flac"]), __key__=s["__key__"] + "_stereo"), NotMonoAudioError,
               "not_mono_audio"),
}


@pytest.fixture(scope="module")
def good_speech(dm):
    return read_shard(dm.shards("train")[0])


def speech_source(path):
    return {"s": {"shards": str(path), "tasks": {"asr": 1}}}


@pytest.mark.parametrize("kind", sorted(BAD_SPEECH))
def test_bad_speech_sample_raises_or_is_counted_by_kind(dm, good_speech, tmp_path, kind, caplog):
    make, error, reason = BAD_SPEECH[kind]
    bad = make(good_speech[0])
    shard = write_shard(tmp_path / f"{kind}.tar", [bad, *good_speech[1:]])
    with pytest.raises(error) as err:
        next(iter(make_stream(dm, speech_source(shard), on_bad_sample="raise", verify_audio="header")))
    assert bad["__key__"] in str(err.value) and str(shard) in str(err.value)
    with caplog.at_level(logging.WARNING, logger="most_lightning.data.samples"):
        batches = list(make_stream(dm, speech_source(shard), mode="exact", batches_per_epoch=None,
                                   verify_audio="header"))
    assert sum(b["n_skipped"] for b in batches) == 1
    assert [b["n_skipped_by_reason"] for b in batches if b["n_skipped"]] == [{reason: 1}]
    assert sorted(k for b in batches for k in b["key"]) == sorted(s["__key__"] for s in good_speech[1:])
    assert any(bad["__key__"] in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)


def test_corrupt_and_truncated_shards_are_counted_or_raise(dm, good_speech, tmp_path):
    good = write_shard(tmp_path / "good.tar", good_speech)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00not a tar" * 500)
    for broken in (truncated, garbage):
        with pytest.raises(CorruptShardError, match=broken.name):
            list(make_stream(dm, speech_source(broken), mode="exact", batches_per_epoch=None, on_bad_sample="raise"))
    batches = list(make_stream(dm, speech_source(tmp_path / "*.tar"), mode="exact", batches_per_epoch=None))
    reasons = collections.Counter()
    for b in batches:
        reasons.update(b["n_skipped_by_reason"])
    assert reasons["corrupt_shard"] == 2
    keys = [k for b in batches for k in b["key"]]
    assert set(keys) == {s["__key__"] for s in good_speech} and len(keys) >= len(good_speech)
    # in an endless mode a source that is nothing but corrupt shards stops with an error, never a hang
    with pytest.raises(RuntimeError, match="gave no sample"):
        next(iter(make_stream(dm, speech_source(garbage))))


def test_bad_chat_samples(dm, tmp_path):
    ok = chat_sample("ok", [{"role": "user", "text": "hi", "units": [1, 2]}, {"role": "assistant", "text": "yo"}])
    empty_turn = chat_sample("empty", [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "  "}])
    no_assistant = chat_sample("lonely", [{"role": "user", "text": "hi"}])
    missing_units = dict(ok, __key__="nounits")
    del missing_units["turn0.units.npy"]
    bad_role = chat_sample("role", [{"role": "robot", "text": "x"}, {"role": "assistant", "text": "y"}])
    cases = {"empty": EmptyTurnError, "lonely": BadChatError, "nounits": MissingMemberError, "role": BadChatError}
    shard = write_shard(tmp_path / "chat.tar", [ok, empty_turn, no_assistant, missing_units, bad_role])
    for sample in (empty_turn, no_assistant, missing_units, bad_role):
        with pytest.raises(cases[sample["__key__"]], match=sample["__key__"]):
            decode_chat_sample(dict(sample, __url__=str(shard)), 32)
    batches = list(make_stream(dm, {"c": {"shards": str(shard), "tasks": {"text_chat": 1}}}, mode="exact",
                               batches_per_epoch=None))
    assert [k for b in batches for k in b["key"]] == ["ok"]
    counts = collections.Counter()
    for b in batches:
        counts.update(b["n_skipped_by_reason"])
    assert counts == {"empty_turn": 1, "bad_chat": 2, "missing_member": 1}


# ---------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_x_two_workers_exact_pass_and_resampled_uneven_shards(data_root, synthetic, tmp_path):
    from most_lightning.data.testing import ddp_sources_probe

    exact = {"s": {"shards": str(synthetic / "speech-*.tar"), "tasks": {"asr": 1}},
             "t": {"shards": str(synthetic / "text-*.tar"), "tasks": {"text": 1}}}  # 3 text shards < 4 readers
    # shards of 3..12 samples: per-rank sample counts differ, batch counts must not
    uneven = {"s": {"shards": str(synthetic / "speech-*.tar"), "tasks": {"asr": 0.5, "speech_lm": 0.5}}}
    runs = {"exact": (exact, "exact"), "resampled": (uneven, "resampled")}
    torch.multiprocessing.spawn(ddp_sources_probe, nprocs=2, join=True,
                                args=(2, str(tmp_path / "init"), str(data_root), str(tmp_path), runs, 2))
    ranks = {name: [json.loads((tmp_path / f"{name}_rank{r}.json").read_text()) for r in range(2)] for name in runs}

    keys = [k for r in ranks["exact"] for k in r["keys"]]
    expected = speech_keys(synthetic) | {s["__key__"] for p in synthetic.glob("text-*.tar") for s in read_shard(p)}
    assert len(keys) == len(set(keys)) == len(expected) and set(keys) == expected
    assert all(r["keys"] for r in ranks["exact"])

    res = ranks["resampled"]
    assert res[0]["batches"] == res[1]["batches"] == 7
    own = [set(r["keys"]) for r in res]
    assert own[0] and own[1] and not own[0] & own[1]  # 12 shards >= 4 readers: each rank reads its own shards
    assert res[0]["state_ranks"] == res[1]["state_ranks"] == ["0", "1"]  # rank 0's checkpoint holds both
