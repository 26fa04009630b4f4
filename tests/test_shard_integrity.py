"""Shard integrity: short or corrupt shards are reported as `corrupt_shard` with the samples lost, on the training
stream and the exact pass and at every cut position; skip counts per kind, once per sample per pass, in skipped.tsv and metrics."""

from __future__ import annotations

import collections
import hashlib
import json
import random
import tarfile
from pathlib import Path

import pytest

from most_lightning.data.datamodule import MoSTDataModule
from most_lightning.data.pipeline import SourceMixStream
from most_lightning.data.samples import CorruptShardError
from most_lightning.data.sources import parse_sources
from most_lightning.data.testing import TINY_RECIPE, build_tiny_corpus, read_shard, units_npy, write_shard

N = 100  # samples in the test shard
CUT_SAMPLE = 50  # the cuts below fall in or right before this sample


@pytest.fixture(scope="session")
def dm(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "most_data_corpus"  # the data tests' shared tiny corpus
    build_tiny_corpus(root)
    dm = MoSTDataModule.from_settings(data_dir=str(root), corpus=TINY_RECIPE, progress=False, batch_size=4,
                                      max_length=None)
    dm.setup("fit")
    return dm


def samples(n: int = N) -> list[dict]:
    rng = random.Random(0)
    return [{"__key__": f"u{i:03d}", "txt": f"sentence number {i}".encode(), "json": b"{}",
             "units.npy": units_npy([rng.randrange(32) for _ in range(rng.randrange(3, 12))])} for i in range(n)]


def write_with_manifest(folder: Path, name: str = "train-00000.tar", content: list[dict] | None = None) -> Path:
    """A shard and a manifest.json beside it in the preparer's layout (path, samples, bytes, sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    shard = write_shard(folder / name, content or samples())
    data = shard.read_bytes()
    (folder / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": [
        {"path": name, "samples": len(content or samples()), "bytes": len(data),
         "sha256": hashlib.sha256(data).hexdigest()}]}}}))
    return shard


def member_offsets(shard: Path) -> list[tuple[str, int, int, int]]:
    """(name, header offset, data offset, size) of every member."""
    with tarfile.open(shard) as tf:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tf.getmembers()]


def cut_at(shard: Path, where: str) -> int:
    """Truncate the shard; returns how many whole samples remain readable."""
    members = member_offsets(shard)
    first = [m for m in members if m[0].startswith(f"u{CUT_SAMPLE:03d}.")]
    data = shard.read_bytes()
    if where == "mid_member":  # inside the data of sample 50's second member
        _, _, start, size = first[1]
        n, keep = CUT_SAMPLE, start + size // 2
    elif where == "header_boundary":  # exactly at the member boundary between samples 49 and 50
        n, keep = CUT_SAMPLE, first[0][1]
    elif where == "inside_sample_boundary":  # a member boundary inside sample 50 (its first member is whole)
        n, keep = CUT_SAMPLE, first[1][1]
    elif where == "block_512":
        n, keep = 0, 512
    elif where == "empty":
        n, keep = 0, 0
    else:
        raise ValueError(where)
    shard.write_bytes(data[:keep])
    return n


CUTS = ["mid_member", "header_boundary", "inside_sample_boundary", "block_512", "empty"]


def source_stream(dm, shard, mode="exact", **kw) -> SourceMixStream:
    kw.setdefault("batches_per_epoch", None if mode == "exact" else 3)
    return SourceMixStream(parse_sources({"speech": {"shards": str(shard), "tasks": {"asr": 1.0}}}), dm.tokenizer,
                           batch_size=10, mode=mode, shuffle_buffer=0, verify_audio="none", **kw)


def skip_counting_module(dm) -> MoSTDataModule:
    """A datamodule over the same tiny corpus that only counts the skips of the batches handed to it."""
    return MoSTDataModule.from_settings(data_dir=dm.data_dir, corpus=TINY_RECIPE, progress=False, batch_size=4,
                                        max_length=None)


def tally(batches) -> tuple[list[str], collections.Counter, int]:
    reasons: collections.Counter = collections.Counter()
    for b in batches:
        reasons.update(b.get("n_skipped_by_reason") or {})
    return [k for b in batches for k in b["key"]], reasons, sum(b["n_skipped"] for b in batches)


def test_intact_shard_with_manifest_reads_whole(dm, tmp_path):
    shard = write_with_manifest(tmp_path / "speech")
    keys, reasons, n_skipped = tally(list(source_stream(dm, shard, verify="sha256")))
    assert sorted(keys) == [f"u{i:03d}" for i in range(N)] and n_skipped == 0 and not reasons


@pytest.mark.parametrize("where", CUTS)
def test_cut_shard_general_pipeline_counts_lost_samples(dm, tmp_path, where):
    shard = write_with_manifest(tmp_path / "speech")
    n = cut_at(shard, where)
    if n == 0:  # no batch to carry the count: the pass says so instead of ending empty
        with pytest.raises(RuntimeError, match=r"no usable sample.*100 bad sample.*corrupt_shard"):
            list(source_stream(dm, shard))
        with pytest.raises(RuntimeError, match=r"gave no sample.*100 bad sample"):
            list(source_stream(dm, shard, mode="split"))
    keys, reasons, n_skipped = tally(list(source_stream(dm, shard))) if n else ([], {"corrupt_shard": N}, N)
    assert sorted(keys) == [f"u{i:03d}" for i in range(n)]
    assert reasons == {"corrupt_shard": N - n} and n_skipped == N - n
    with pytest.raises(CorruptShardError, match=rf"{shard.name}.*{N - n} sample\(s\) lost"):
        list(source_stream(dm, shard, on_bad_sample="raise"))


def test_resampled_source_counts_a_cut_shard_once_per_pass(dm, tmp_path):
    shard = write_with_manifest(tmp_path / "speech")
    cut_at(shard, "header_boundary")
    # 31 batches of 10 = 310 records from a 50-sample shard: 6 whole passes over it (the 7th has begun), each
    # counts the 50 samples lost once, when it reaches the cut
    keys, reasons, _ = tally(list(source_stream(dm, shard, mode="split", batches_per_epoch=31)))
    assert len(keys) == 310 and reasons == {"corrupt_shard": (N - CUT_SAMPLE) * 6}


def test_header_boundary_cut_without_a_manifest_is_still_reported(dm, tmp_path):
    """The defect: a shard cut exactly at a member boundary lost its remaining samples with n_skipped 0."""
    shard = write_shard(tmp_path / "plain.tar", samples())
    cut_at(shard, "header_boundary")
    keys, reasons, n_skipped = tally(list(source_stream(dm, shard)))
    assert len(keys) == CUT_SAMPLE and reasons["corrupt_shard"] >= 1 and n_skipped >= 1
    with pytest.raises(CorruptShardError, match="end-of-archive"):
        list(source_stream(dm, shard, on_bad_sample="raise"))


def test_512_byte_cut_is_corrupt_shard_not_a_missing_member(dm, tmp_path):
    """The defect: a cut at 512 bytes was counted as one "no 'txt' member" and the rest vanished."""
    shard = write_with_manifest(tmp_path / "speech")
    cut_at(shard, "block_512")
    with pytest.raises(RuntimeError, match=r"100 bad sample.*'corrupt_shard': 100"):
        list(source_stream(dm, shard))
    with pytest.raises(CorruptShardError, match="100 sample"):
        list(source_stream(dm, shard, on_bad_sample="raise"))


def test_sha256_verification_drops_a_shard_with_flipped_bytes(dm, tmp_path):
    shard = write_with_manifest(tmp_path / "speech")
    data = bytearray(shard.read_bytes())
    spot = data.index(b"sentence number 7")
    data[spot:spot + 8] = b"SENTENCE"  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    keys, reasons, _ = tally(list(source_stream(dm, shard, verify="size")))
    assert len(keys) == N and not reasons
    with pytest.raises(RuntimeError, match=r"no usable sample.*'corrupt_shard': 100"):
        list(source_stream(dm, shard, verify="sha256"))
    with pytest.raises(CorruptShardError, match="sha256"):
        list(source_stream(dm, shard, verify="sha256", on_bad_sample="raise"))


def test_size_mismatch_raises_at_open_and_missing_samples_count(dm, tmp_path):
    shard = write_with_manifest(tmp_path / "speech")
    manifest = json.loads((tmp_path / "speech" / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    write_shard(shard, samples(N - 3))  # re-written with fewer samples: a whole tar, but not the manifest's
    with pytest.raises(CorruptShardError, match="bytes, the manifest says"):
        next(iter(source_stream(dm, shard, on_bad_sample="raise")))
    keys, reasons, _ = tally(list(source_stream(dm, shard)))
    assert len(keys) == N - 3 and reasons == {"corrupt_shard": 3} and entry["samples"] == N


def test_demo_corpus_manifest_is_checked(dm, tmp_path):
    """The demo corpus' manifest (one folder above its shards) lists each shard's samples: a cut one is caught."""
    good = Path(dm.shards("train")[0])
    corpus = tmp_path / "corpus"
    (corpus / "speech").mkdir(parents=True)
    manifest = json.loads((dm.corpus_dir / "manifest.json").read_text())
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    rel = next(s["path"] for s in manifest["speech"]["train"]["shards"] if good.name in s["path"])
    (corpus / rel).write_bytes(good.read_bytes())
    n_good = len(read_shard(good))
    first_member_of_last = member_offsets(corpus / rel)[-4][1]  # 4 members per sample: the last sample's start
    (corpus / rel).write_bytes(good.read_bytes()[:first_member_of_last])
    batches = list(SourceMixStream(parse_sources({"s": {"shards": str(corpus / rel), "tasks": {"asr": 1}}}),
                                   dm.tokenizer, mode="exact", verify_audio="none"))
    keys, reasons, _ = tally(batches)
    assert len(keys) == n_good - 1 and reasons == {"corrupt_shard": 1}


def test_skip_report_writes_tsv_and_sums(dm, tmp_path):
    shard = write_with_manifest(tmp_path / "speech")
    cut_at(shard, "mid_member")
    fresh = skip_counting_module(dm)
    for batch in source_stream(dm, shard):
        fresh.on_before_batch_transfer(batch, 0)  # what Lightning calls before each training step
        assert "skipped_rows" not in batch
    sums = fresh.write_skip_report(tmp_path / "run")
    lines = (tmp_path / "run" / "skipped.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:5] == ["split", "shard", "key", "reason", "samples"]
    assert [line.split("\t")[:5] for line in lines[1:]] == [["train", str(shard), "*", "corrupt_shard", "50"]]
    assert sums == {"data/n_skipped": 50.0, "data/n_skipped/corrupt_shard": 50.0}


def test_training_skips_survive_a_checkpoint(dm, tmp_path):
    """skipped.tsv of a resumed run still lists the skips made before the checkpoint (and only once)."""
    shard = write_with_manifest(tmp_path / "speech")
    cut_at(shard, "mid_member")
    before = skip_counting_module(dm)
    for batch in source_stream(dm, shard):
        before.on_before_batch_transfer(batch, 0)
    state = before.state_dict()
    torch_state = __import__("json").loads(__import__("json").dumps(state))  # plain values, as in a checkpoint
    after = skip_counting_module(dm)
    after.skip_ledger.append(("validation", "v.tar", "k", "empty_transcript", 1, ""))
    after.load_state_dict(torch_state)
    assert after.skip_counts() == {"corrupt_shard": 50, "empty_transcript": 1}
    assert after._resume_state is None  # no stream position in this state: nothing to resume from


def test_test_loaders_count_a_bad_test_sample_once(dm, tmp_path):
    """The ASR, mismatched-ASR and TTS+text test loaders read the same test records in one pass."""
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(dm.corpus_dir, corpus)
    manifest = json.loads((corpus / "manifest.json").read_text())
    entry = manifest["speech"]["test"]["shards"][0]
    shard = corpus / entry["path"]
    content = read_shard(shard)
    write_shard(shard, [dict(content[0], txt=b" "), *content[1:]])
    data = shard.read_bytes()
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    test_dm = MoSTDataModule.from_settings(corpus_dir=str(corpus), batch_size=4, max_length=None)
    loaders = [*test_dm.test_dataloader(), test_dm.asr_generation_dataloader("test", mismatched=True)]
    assert sum(b["n_skipped"] for loader in loaders for b in loader) == 1
    assert test_dm.skip_counts() == {"empty_transcript": 1}


def test_a_shard_deleted_after_start_counts_its_manifest_samples(dm, tmp_path):
    folder = tmp_path / "speech"
    folder.mkdir()
    entries = []
    for j in range(2):
        shard = write_shard(folder / f"train-{j:05d}.tar", [dict(s, __key__=f"{s['__key__']}_{j}") for s in samples(10)])
        entries.append({"path": shard.name, "samples": 10, "bytes": shard.stat().st_size})
    (folder / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": entries}}}))
    stream = SourceMixStream(parse_sources({"s": {"shards": str(folder / "*.tar"), "tasks": {"asr": 1}}}),
                             dm.tokenizer, batch_size=4, mode="exact", verify_audio="none")
    (folder / "train-00001.tar").unlink()  # gone between start-up and reading (a lost mount, a cleanup job)
    keys, reasons, n_skipped = tally(list(stream))
    assert len(keys) == 10 and reasons == {"corrupt_shard": 10} and n_skipped == 10
