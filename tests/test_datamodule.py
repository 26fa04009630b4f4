"""MoSTDataModule: contract batches, task mixing, rank/worker shard splitting, eval loaders, bad-sample policy."""

import collections
import io
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from most_lightning.data.datamodule import MoSTDataModule, derangement
from most_lightning.data.samples import (CorruptShardError, EmptyTranscriptError, InvalidUnitsError,
                                         MissingMemberError, OverlongSampleError, UndecodableAudioError,
                                         WrongSampleRateError)
from most_lightning.data.pipeline import SourceMixStream
from most_lightning.data.sources import corpus_sources
from most_lightning.data.tasks import IGNORE_INDEX
from most_lightning.data.testing import TINY_RECIPE, bad_variant, build_tiny_corpus, read_shard, write_shard

CONTRACT_KEYS = {"input_ids", "labels", "modality", "attention_mask", "task", "n_skipped"}
GEN_KEYS = {"prompt_ids", "prompt_mask", "prompt_modality", "reference_text", "key", "n_skipped"}


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "most_data_corpus"  # same cache as test_corpus.py: built once
    build_tiny_corpus(root)
    return root


def make_dm(data_root, **kw) -> MoSTDataModule:
    kw.setdefault("batch_size", 4)
    kw.setdefault("max_length", None)
    dm = MoSTDataModule.from_settings(data_dir=str(data_root), corpus=TINY_RECIPE, progress=False, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def stream(dm: MoSTDataModule, shards, task_weights=None, shard_sampling="split", **kw) -> SourceMixStream:
    """The training stream over `shards` as the speech source and the corpus's text shards (the default sources)."""
    args = dict(batch_size=2, batches_per_epoch=1, shuffle_buffer=0)
    args.update(kw)
    specs = corpus_sources(shards, dm.shards("text"), task_weights or {"asr": 1.0})
    return SourceMixStream(specs, dm.tokenizer, mode=shard_sampling, **args)


def all_keys(dm, split):
    return {s["__key__"] for sh in dm.shards(split) for s in read_shard(sh)}


def test_train_batches_follow_the_contract(data_root):
    dm = make_dm(data_root)
    tok = dm.tokenizer
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == dm.default_batches_per_epoch() == 7  # 20 utt / 0.8 speech share / 4
    for b in batches:
        assert CONTRACT_KEYS <= set(b)
        B, T = b["input_ids"].shape
        assert B == 4 and b["labels"].shape == b["modality"].shape == b["attention_mask"].shape == (B, T)
        assert b["input_ids"].dtype == b["labels"].dtype == b["modality"].dtype == torch.long
        assert b["attention_mask"].dtype == torch.bool and isinstance(b["n_skipped"], int) and b["n_skipped"] == 0
        mask = b["attention_mask"]
        lengths = mask.sum(1)
        assert torch.equal(mask, torch.arange(T)[None] < lengths[:, None])  # right padding
        assert (b["input_ids"][~mask] == tok.pad_id).all() and (b["labels"][~mask] == IGNORE_INDEX).all()
        assert torch.equal(b["modality"], tok.modality_of(b["input_ids"]) * mask)
        for row, task in enumerate(b["task"]):
            ids, labels, n = b["input_ids"][row], b["labels"][row], lengths[row]
            labeled = (labels[:n] != IGNORE_INDEX).nonzero().flatten()
            assert torch.equal(labels[labeled], ids[labeled])  # labels are aligned with input_ids
            if task == "text":
                assert labeled.tolist() == list(range(1, n))
            else:  # response = BOS + output + EOS, contiguous at the end
                assert labeled.tolist() == list(range(n - len(labeled), n)) and ids[labeled[0]] == tok.bos_id
                audio_in_response = b["modality"][row, labeled].sum().item()
                assert (audio_in_response > 0) == (task == "tts")


MIXTURE = {"asr": 0.4, "tts": 0.4, "text": 0.2}


@pytest.mark.parametrize("batching", ["pack", "bucket"])
def test_training_stream_batches_by_data_batching(data_root, batching):
    """Batching does not change which examples the stream draws: their order is that of batch_size=1 batches."""
    dm = make_dm(data_root)
    one_by_one = [(b["key"][0], tuple(b["input_ids"][0][b["attention_mask"][0]].tolist()))
                  for b in stream(dm, dm.shards("train"), task_weights=MIXTURE, batch_size=1, batches_per_epoch=80)]
    batches = list(stream(dm, dm.shards("train"), task_weights=MIXTURE, batches_per_epoch=3, batching=batching,
                          max_tokens=512, max_length=256, bucket_pool=8))
    assert len(batches) == 3
    drawn, most_in_a_row = [], 0
    for b in batches:
        assert b["input_ids"].numel() <= 512
        if batching == "bucket":
            drawn += [(k, tuple(ids[m].tolist())) for k, ids, m in zip(b["key"], b["input_ids"], b["attention_mask"])]
            continue
        assert b["input_ids"].shape[0] <= 2 and b["input_ids"].shape[1] <= 256
        for ids, segments in zip(b["input_ids"], b["segment_ids"]):
            for s in range(1, int(segments.max()) + 1):
                drawn.append(tuple(ids[segments == s].tolist()))
        assert len(b["key"]) == sum(int(seg.max()) for seg in b["segment_ids"])
        most_in_a_row = max(most_in_a_row, int(b["segment_ids"].max()))
    if batching == "pack":  # rows are filled in drawing order
        assert most_in_a_row >= 2 and drawn == [ids for _, ids in one_by_one[:len(drawn)]]
    else:  # buckets leave in a random order; the longest group of a pool may wait for the next pool
        assert len(set(drawn)) == len(drawn) and set(drawn) <= set(one_by_one[:len(drawn) + 8])


def test_training_stream_rejects_impossible_batching_at_construction(data_root):
    dm = make_dm(data_root)
    with pytest.raises(ValueError, match="needs data.max_tokens"):
        stream(dm, dm.shards("train"), batching="pack", max_length=256)
    with pytest.raises(ValueError, match="continuous audio"):
        stream(dm, dm.shards("train"), batching="pack", max_tokens=512, max_length=256, audio_frames=lambda n: n // 320)


def test_mixing_weights_are_respected(data_root):
    dm = make_dm(data_root, batch_size=8, batches_per_epoch=100, task_weights={"asr": 0.5, "tts": 0.3, "text": 0.2})
    counts = collections.Counter(t for b in dm.train_dataloader() for t in b["task"])
    n = sum(counts.values())
    assert n == 800
    for task, p in {"asr": 0.5, "tts": 0.3, "text": 0.2}.items():
        assert abs(counts[task] / n - p) < 4 * (p * (1 - p) / n) ** 0.5, counts
    only_asr = make_dm(data_root, batches_per_epoch=5, task_weights={"asr": 1.0, "tts": 0.0, "text": 0})
    assert {t for b in only_asr.train_dataloader() for t in b["task"]} == {"asr"}
    with pytest.raises(ValueError, match="unknown: \\['chat'\\]"):
        MoSTDataModule.from_settings(data_dir=str(data_root / "unused"), task_weights={"asr": 1, "chat": 1})
    with pytest.raises(ValueError, match="positive weight"):
        MoSTDataModule.from_settings(data_dir=str(data_root / "unused"), task_weights={"asr": 0})


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_rank_and_worker_shards_are_disjoint(data_root):
    dm = make_dm(data_root)
    shards = dm.shards("train")
    assert len(shards) == 5
    # whole streams: each rank only ever sees its own shards, and the two ranks never share a key
    seen = {}
    for rank in range(2):
        ds = dm.source_stream(rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        keys = [k for b in loader for k in b["key"]]
        seen[rank] = {k for k in keys if not k.startswith("text")}
        seen[f"text{rank}"] = {k for k in keys if k.startswith("text")}
        own = {s["__key__"] for sh in shards[rank::2] for s in read_shard(sh)}
        assert seen[rank] and seen[rank] <= own
    assert not seen[0] & seen[1]
    assert not seen["text0"] & seen["text1"]  # 3 text shards < 4 slots: split by sample, still disjoint
    # resampled shards work for any shard count
    res = dm.source_stream(mode="resampled", rank=1, world_size=8)
    assert len(list(torch.utils.data.DataLoader(res, batch_size=None, num_workers=2))) == len(res)


def test_epochs_reshuffle_and_workers_share_the_batch_count(data_root):
    dm = make_dm(data_root, num_workers=2, batches_per_epoch=5)
    loader = dm.train_dataloader()
    first = [k for b in loader for k in b["key"]]
    second = [k for b in loader for k in b["key"]]
    assert len(first) == len(second) == 20 and first != second


def test_the_demo_corpus_trains_through_its_default_sources(data_root):
    """data.sources null: the train speech shards (asr, tts) and the text shards (text), weighted by task_weights."""
    dm = make_dm(data_root, task_weights={"asr": 0.5, "tts": 0.0, "text": 0.25})
    specs = dm.source_specs()
    assert [(s.name, s.shards, s.tasks) for s in specs] == [
        ("speech", tuple(dm.shards("train")), (("asr", 0.5),)), ("text", tuple(dm.shards("text")), (("text", 0.25),))]
    assert {t for b in dm.train_dataloader() for t in b["task"]} == {"asr", "text"}
    with pytest.raises(ValueError, match="no text shards"):
        corpus_sources(dm.shards("train"), [], {"text": 1.0})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_demo_corpus_resumes_bit_exactly_at_its_data_position(data_root, num_workers):
    """After restoring the state of a checkpoint taken mid-epoch, the next batches are the uninterrupted run's,
    tensor for tensor, into the next epoch (default shuffle buffer; 2 workers: the resumed epoch starts at worker 1)."""
    def batches(dm, n):
        out, loader = [], dm.train_dataloader()
        while len(out) < n:
            for b in loader:
                dm.on_before_batch_transfer(b, 0)  # what Lightning does right before each training step
                out.append(b)
                if len(out) == n:
                    break
        return out

    kw = dict(num_workers=num_workers, batch_size=3, batches_per_epoch=5)
    reference = batches(make_dm(data_root, **kw), 9)
    first = make_dm(data_root, **kw)
    before = batches(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores: plain values
    resumed = make_dm(data_root, **kw)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    after = [b for b in loader] + [b for b in loader][:4]  # the rest of epoch 1 (2 batches), then epoch 2
    assert [b["key"] for b in before] == [b["key"] for b in reference[:3]]
    assert len(after) == 6
    for got, want in zip(after, reference[3:]):
        assert got["key"] == want["key"] and got["task"] == want["task"]
        for name in ("input_ids", "labels", "modality", "attention_mask"):
            assert torch.equal(got[name], want[name]), name


def test_continuous_audio_batches_come_from_the_training_stream(data_root):
    """MoST-C (audio=continuous): ASR rows carry frame slots and their waveform; TTS and text rows are unchanged."""
    from most_lightning.data.continuous import frame_counter

    audio = {"mode": "continuous", "encoder": {"kind": "hubert", "checkpoint": None, "format": "auto", "layer": "last",
                                               "arch": "tiny", "seed": 0}}
    dm = make_dm(data_root, audio=audio, batches_per_epoch=4)
    frames = frame_counter(dm.audio.encoder)
    tasks = collections.Counter()
    for b in dm.train_dataloader():
        if "asr" not in b["task"]:
            assert "audio_mask" not in b
            continue
        assert b["audio_mask"].shape == b["input_ids"].shape
        for row, task in enumerate(b["task"]):
            tasks[task] += 1
            slots = int(b["audio_mask"][row].sum())
            n_samples = int(b["audio_wave_lengths"][row])
            if task == "asr":
                assert n_samples > 0 and slots == frames(n_samples)
                assert (b["labels"][row][b["audio_mask"][row]] == IGNORE_INDEX).all()
                assert (b["modality"][row][b["audio_mask"][row]] == 1).all()
            else:
                assert slots == 0 and n_samples == 0
    assert tasks["asr"] > 0 and tasks["tts"] + tasks["text"] > 0
    with pytest.raises(ValueError, match="continuous audio"):
        make_dm(data_root, audio=audio, batching="pack", max_tokens=512, max_length=256).train_dataloader()



def test_validation_is_one_exact_pass_over_all_tasks(data_root):
    dm = make_dm(data_root, eval_batch_size=5)
    examples = [(k, t) for b in dm.val_dataloader() for k, t in zip(b["key"], b["task"])]
    keys = all_keys(dm, "validation")
    assert sorted(examples) == sorted((k, t) for k in keys for t in ("asr", "tts", "text"))
    limited = make_dm(data_root, val_limit=2, val_tasks=["asr"])
    assert sum(len(b["task"]) for b in limited.val_dataloader()) == 2


def test_test_loaders_generation_and_teacher_forced(data_root):
    dm = make_dm(data_root, eval_batch_size=4)
    tok = dm.tokenizer
    gen, tf = dm.test_dataloader()
    batches = list(gen)
    assert sum(len(b["key"]) for b in batches) == TINY_RECIPE.n_test
    b = batches[0]
    assert GEN_KEYS <= set(b) and b["prompt_ids"].dtype == torch.long and b["prompt_mask"].dtype == torch.bool
    assert b["prompt_mask"][:, -1].all()  # left padding: every prompt ends in the last column
    P = b["prompt_ids"].shape[1]
    starts = P - b["prompt_mask"].sum(1)
    assert torch.equal(b["prompt_mask"], torch.arange(P)[None] >= starts[:, None])
    assert torch.equal(b["prompt_modality"], tok.modality_of(b["prompt_ids"]) * b["prompt_mask"])
    records, _ = dm.speech_records("test")
    assert b["reference_text"] == [r.transcript for r in records[:4]]
    assert {t for batch in tf for t in batch["task"]} == {"tts", "text"}
    # text-prior baseline: same references, every prompt carries the units of another sentence
    mism = [b for b in dm.asr_generation_dataloader("test", mismatched=True)]
    assert all(b["mismatched"] is True for b in mism) and not any("mismatched" in b for b in batches)
    assert [t for b in mism for t in b["reference_text"]] == [r.transcript for r in records]
    by_units = {tuple(r.units): r.transcript for r in records}
    for b in mism:
        for row, ref in enumerate(b["reference_text"]):
            units = tuple(tok.decode_units(b["prompt_ids"][row][b["prompt_mask"][row]]))
            assert units in by_units and by_units[units] != ref


def test_derangement_has_no_fixed_points():
    for n in (2, 3, 10, 101):
        perm = derangement(n, seed=n)
        assert sorted(perm) == list(range(n)) and all(perm[i] != i for i in range(n))
    assert derangement(10, 0) == derangement(10, 0)
    with pytest.raises(ValueError):
        derangement(1, 0)


BAD_KINDS = {"garbage_audio": UndecodableAudioError, "missing_transcript": MissingMemberError,
             "empty_transcript": EmptyTranscriptError, "wrong_sample_rate": WrongSampleRateError,
             "missing_units": MissingMemberError}


@pytest.fixture(scope="module")
def good_samples(data_root):
    dm = make_dm(data_root)
    return read_shard(dm.shards("train")[0])


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_sample_raises_naming_key_and_shard(data_root, good_samples, tmp_path, kind):
    dm = make_dm(data_root, on_bad_sample="raise")
    shard = write_shard(tmp_path / f"{kind}.tar", [bad_variant(good_samples[0], kind), *good_samples[1:]])
    with pytest.raises(BAD_KINDS[kind]) as err:
        next(iter(stream(dm, [str(shard)], on_bad_sample="raise")))
    assert f"{good_samples[0]['__key__']}_{kind}" in str(err.value) and str(shard) in str(err.value)


def test_bad_samples_are_skipped_and_counted(data_root, good_samples, tmp_path):
    dm = make_dm(data_root)
    bad = [bad_variant(good_samples[0], kind) for kind in BAD_KINDS]
    shard = write_shard(tmp_path / "mixed.tar", [*bad, *good_samples])
    batch = next(iter(stream(dm, [str(shard)], batch_size=len(good_samples), on_bad_sample="skip")))
    assert batch["n_skipped"] == len(bad) and len(batch["key"]) == len(good_samples)
    assert set(batch["key"]) == {s["__key__"] for s in good_samples}


def test_invalid_units_and_wrong_metadata_rate_are_bad_samples(data_root, good_samples, tmp_path):
    dm = make_dm(data_root, on_bad_sample="raise")
    out_of_range = dict(good_samples[0], **{"units.npy": _npy([1, 2, 999])})
    shard = write_shard(tmp_path / "units.tar", [out_of_range])
    with pytest.raises(InvalidUnitsError, match="outside"):
        next(iter(stream(dm, [str(shard)], on_bad_sample="raise")))
    meta = json.loads(good_samples[0]["json"])
    lying = dict(good_samples[0], json=json.dumps({**meta, "sample_rate": 22050}).encode())
    shard = write_shard(tmp_path / "meta.tar", [lying])
    with pytest.raises(WrongSampleRateError, match="22050"):
        next(iter(stream(dm, [str(shard)], on_bad_sample="raise")))


def _npy(values):
    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype=np.int16))
    return buf.getvalue()


def test_corrupt_shards_raise_or_are_counted(data_root, good_samples, tmp_path):
    dm = make_dm(data_root)
    good = write_shard(tmp_path / "good.tar", good_samples)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00garbage" * 1000)
    for broken in (truncated, garbage, tmp_path / "missing.tar"):
        with pytest.raises(CorruptShardError, match=broken.name):
            list(stream(dm, [str(broken)], batch_size=len(good_samples), on_bad_sample="raise"))
    batch = next(iter(stream(dm, [str(garbage), str(truncated), str(good)], batch_size=len(good_samples) + 1,
                             on_bad_sample="skip", shard_sampling="split", seed=3)))
    assert batch["n_skipped"] >= 2 and len(batch["key"]) == len(good_samples) + 1
    with pytest.raises(RuntimeError, match="gave no sample"):
        next(iter(stream(dm, [str(garbage)], on_bad_sample="skip")))


def test_overlong_samples_follow_the_policy(data_root, good_samples, tmp_path):
    dm = make_dm(data_root)
    shard = str(write_shard(tmp_path / "ok.tar", good_samples))
    with pytest.raises(OverlongSampleError, match="max_length 30") as err:
        next(iter(stream(dm, [shard], max_length=30, on_bad_sample="raise")))
    assert "ok.tar" in str(err.value)
    text_only = next(iter(stream(dm, [shard], max_length=30, on_bad_sample="skip",
                                 task_weights={"asr": 1, "text": 1}, batch_size=6, seed=1)))
    assert text_only["n_skipped"] > 0 and set(text_only["task"]) == {"text"}
    cut = next(iter(stream(dm, [shard], max_length=30, max_length_policy="truncate")))
    assert cut["input_ids"].shape[1] == 30 and cut["n_truncated"] == 2


def refresh_manifest(corpus, shard) -> None:
    """Rewrite the manifest entry of an edited shard (samples, bytes, sha256), as a new preparation would."""
    import hashlib

    manifest = json.loads((corpus / "manifest.json").read_text())
    for split in manifest["speech"].values():
        for entry in split["shards"]:
            if corpus / entry["path"] == shard:
                data = shard.read_bytes()
                entry.update(samples=len(read_shard(shard)), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (corpus / "manifest.json").write_text(json.dumps(manifest))


def test_eval_loaders_apply_the_bad_sample_policy(data_root, good_samples, tmp_path):
    dm = make_dm(data_root)
    corpus = tmp_path / "corpus"
    shutil.copytree(dm.corpus_dir, corpus)
    val_shard = corpus / json.loads((corpus / "manifest.json").read_text())["speech"]["validation"]["shards"][0]["path"]
    samples = read_shard(val_shard)
    write_shard(val_shard, [bad_variant(samples[0], "empty_transcript"), *samples[1:],
                            bad_variant(samples[1], "garbage_audio")])
    refresh_manifest(corpus, val_shard)  # a re-prepared shard: its manifest entry matches (data.verify checks it)
    skip = MoSTDataModule.from_settings(corpus_dir=str(corpus), batch_size=4, max_length=None)
    batches = list(skip.val_dataloader())
    assert sum(b["n_skipped"] for b in batches) == 2
    assert sum(len(b["task"]) for b in batches) == 3 * (len(samples) - 1)
    strict = MoSTDataModule.from_settings(corpus_dir=str(corpus), batch_size=4, max_length=None, on_bad_sample="raise")
    with pytest.raises(EmptyTranscriptError, match=samples[0]["__key__"]):
        strict.val_dataloader()


def test_hydra_instantiates_it_from_plain_config(data_root):
    cfg = OmegaConf.create({
        "_target_": "most_lightning.data.MoSTDataModule.from_settings", "data_dir": str(data_root),
        "corpus": {k: v for k, v in TINY_RECIPE.canonical().items() if k != "version"} | {"voices": list(TINY_RECIPE.voices)},
        "task_weights": {"asr": 0.4, "tts": 0.4, "text": 0.2}, "val_tasks": ["asr", "text"], "batch_size": 2,
        "max_length": None, "progress": False})
    dm = instantiate(cfg)
    assert dm.corpus_dir == make_dm(data_root).corpus_dir  # same recipe -> same cache entry
    assert dm.tokenizer.n_units == TINY_RECIPE.n_units and dm.evaluation.val_tasks == ("asr", "text")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        MoSTDataModule.from_settings(corpus_dir=str(data_root / "nowhere")).prepare_data()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_get_equal_batch_counts_and_disjoint_speech(data_root, tmp_path):
    from most_lightning.data.testing import ddp_stream_probe

    torch.multiprocessing.spawn(ddp_stream_probe, nprocs=2,
                                args=(2, str(tmp_path / "init"), str(data_root), str(tmp_path), 2))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["batches"] == ranks[1]["batches"] > 0  # equal counts: DDP cannot hang on an uneven end
    speech = [{k for k in r["keys"] if not k.startswith("text")} for r in ranks]
    assert speech[0] and speech[1] and not speech[0] & speech[1]


def test_demo_corpus_training_counts_bad_samples_by_kind(data_root, good_samples, tmp_path):
    """A train shard of the corpus with bad samples: the default stream skips each once per pass, by kind."""
    dm = make_dm(data_root)
    corpus = tmp_path / "corpus"
    shutil.copytree(dm.corpus_dir, corpus)
    manifest = json.loads((corpus / "manifest.json").read_text())
    shard = corpus / manifest["speech"]["train"]["shards"][0]["path"]
    samples = read_shard(shard)
    kinds = ["empty_transcript", "garbage_audio", "missing_units"]
    write_shard(shard, [bad_variant(s, kind) for s, kind in zip(samples, kinds)] + samples[len(kinds):])
    refresh_manifest(corpus, shard)
    n_good = manifest["speech"]["train"]["utterances"] - len(kinds)
    # one epoch of batches of 1 = exactly one pass over the good train samples
    train = MoSTDataModule.from_settings(corpus_dir=str(corpus), batch_size=1, max_length=None, shuffle_buffer=0,
                                         task_weights={"asr": 1.0}, batches_per_epoch=n_good)
    train.setup("fit")
    by_kind, total, keys = collections.Counter(), 0, []
    for batch in train.train_dataloader():
        by_kind.update(batch["n_skipped_by_reason"])
        total += batch["n_skipped"]
        keys += batch["key"]
        train.on_before_batch_transfer(batch, 0)
    assert len(set(keys)) == n_good
    assert by_kind == {"empty_transcript": 1, "undecodable_audio": 1, "missing_member": 1} and total == 3
    assert train.skip_counts() == dict(by_kind)
    assert sorted(row[2] for row in train.skip_ledger) == sorted(
        f"{s['__key__']}_{kind}" for s, kind in zip(samples, kinds))


def test_unknown_settings_are_refused_naming_the_key(data_root):
    from most_lightning.data.settings import LoaderSettings
    from most_lightning.data.settings_check import DataConfigError, check_data_config

    with pytest.raises(ValueError, match=r"data\.batch_sise: unknown data setting"):
        MoSTDataModule.from_settings(data_dir=str(data_root), batch_sise=8)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['batch_sise'\] for LoaderSettings"):
        MoSTDataModule(loader={"batch_sise": 8})
    with pytest.raises(DataConfigError, match=r"data\.shuffle_bufer"):
        check_data_config({"_target_": "most_lightning.data.MoSTDataModule.from_settings", "shuffle_bufer": 3})
    dm = MoSTDataModule(loader=LoaderSettings(batch_size=8), stream={"task_weights": {"asr": 1.0}})
    assert dm.loader.batch_size == dm.loader.eval_batch_size == 8 and dm.stream.task_weights == {"asr": 1.0}


def test_a_data_position_of_the_removed_demo_stream_is_refused(data_root):
    dm = make_dm(data_root)
    dm.load_state_dict({"world_size": 1, "num_workers": 1, "ranks": {"0": {"0": {"epoch": 0, "batches": 3}}}})
    with pytest.raises(ValueError, match="old demo stream.*resume_data_position=false"):
        next(iter(dm.train_dataloader()))
