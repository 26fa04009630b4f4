"""Corpus preparers on small fixtures in each corpus's real layout: content, schema, determinism, resume, bad inputs."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds

from most_lightning.audio.units import UnitExtractor
from most_lightning.data.prepare import writer
from most_lightning.data.prepare.__main__ import main, run
from most_lightning.data.prepare.common import BadInputError, TextItem
from most_lightning.data.prepare.fixtures import (Clip, refinedweb_rows, smoltalk_rows, speak, write_commonvoice,
                                                  write_jsonl_gz, write_libriheavy, write_librispeech,
                                                  write_parquet, write_voxpopuli)
from most_lightning.data.samples import BadSamplePolicy, decode_speech_sample, iter_records
from most_lightning.data.text_sources import normalize_transcript

REPO_ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["The road was covered with gravel.", "She sells sea shells by the shore.",
             "A quick brown fox jumps over the dog.", "Hello there, my old friend!", "It was a dark and stormy night.",
             "We walked home slowly after dinner.", "The committee met on Tuesday.", "Bring me the red book, please."]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def clips() -> list[Clip]:
    return speak(SENTENCES)


@pytest.fixture(scope="module")
def extractor_dir(tmp_path_factory, clips) -> Path:
    d = tmp_path_factory.mktemp("units")
    UnitExtractor.fit([torch.from_numpy(c.wave) for c in clips], n_units=16, max_frames=5000).save(d)
    return d


def prep(*argv) -> dict:
    manifest = run([*map(str, argv), "--num-workers", "1", "--no-progress"])
    assert manifest is not None
    return manifest


def samples_of(out: Path, manifest: dict, split: str | None = None) -> list[dict]:
    out_samples = []
    for name, entry in manifest["splits"].items():
        if split is None or name == split:
            for shard in entry["shards"]:
                out_samples += list(wds.tarfile_samples([{"url": str(out / shard["path"])}]))
    return out_samples


def decode(flac: bytes) -> tuple[np.ndarray, int, int]:
    data, rate = sf.read(io.BytesIO(flac), dtype="float32", always_2d=True)
    return data[:, 0], rate, data.shape[1]


def pcm16(wave: np.ndarray) -> np.ndarray:
    """What a 16-bit FLAC round trip gives back (libsndfile scales by 32768 and clips)."""
    return np.clip(np.round(wave * 32768), -32768, 32767) / 32768


def check_manifest_integrity(out: Path, manifest: dict) -> None:
    total = 0
    for entry in manifest["splits"].values():
        assert entry["samples"] == sum(s["samples"] for s in entry["shards"])
        for shard in entry["shards"]:
            data = (out / shard["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
            assert len(list(wds.tarfile_samples([{"url": str(out / shard["path"])}]))) == shard["samples"]
        total += entry["samples"]
    assert manifest["samples"] == total


# ================================================================================================ LibriSpeech
def test_librispeech_layout_to_speech_shards(tmp_path, clips):
    split_dir = write_librispeech(tmp_path / "in", "dev-clean", clips)
    assert sorted(p.name for p in split_dir.glob("19/1900/*")) == \
        ["19-1900-0000.flac", "19-1900-0001.flac", "19-1900.trans.txt"]
    out = tmp_path / "out"
    m = prep("librispeech", tmp_path / "in" / "LibriSpeech", "--out", out, "--shard-size", "3")
    check_manifest_integrity(out, m)
    assert m["source"] == "librispeech" and list(m["splits"]) == ["dev-clean"]
    assert [s["samples"] for s in m["splits"]["dev-clean"]["shards"]] == [3, 3, 2]
    samples = samples_of(out, m)
    assert len(samples) == len(clips)
    total = 0.0
    for s in samples:
        assert sorted(k for k in s if not k.startswith("__")) == ["flac", "json", "txt"]
        meta = json.loads(s["json"])
        spk, chap, utt = meta["id"].split("-")
        source = tmp_path / "in" / "LibriSpeech" / "dev-clean" / spk / chap / f"{meta['id']}.flac"
        original, _ = sf.read(source, dtype="float32")
        wave, rate, channels = decode(s["flac"])
        assert (rate, channels) == (16000, 1) and np.array_equal(wave, original)  # lossless round trip
        line = next(l for l in source.with_name(f"{spk}-{chap}.trans.txt").read_text().splitlines()
                    if l.startswith(meta["id"]))
        assert meta["text"] == line.split(" ", 1)[1] and s["txt"].decode() == normalize_transcript(meta["text"])
        assert (meta["speaker"], meta["chapter"], meta["split"], meta["source"]) == (spk, chap, "dev-clean",
                                                                                  "librispeech")
        assert meta["duration"] == pytest.approx(len(original) / 16000, abs=1e-4)
        total += len(original) / 16000
    assert m["hours"] == pytest.approx(total / 3600, rel=1e-4)
    assert m["bad_inputs"] == {"skipped": {}, "fixed": {}, "list": "skipped.tsv"}


def test_units_are_readable_by_the_existing_speech_loader(tmp_path, clips, extractor_dir):
    write_librispeech(tmp_path / "in", "train-clean-100", clips)
    out = tmp_path / "out"
    m = prep("librispeech", tmp_path / "in" / "LibriSpeech" / "train-clean-100", "--out", out,
             "--units", extractor_dir)
    shards = [str(out / s["path"]) for s in m["splits"]["train-clean-100"]["shards"]]
    policy = BadSamplePolicy("raise")
    records = list(iter_records(shards, lambda s: decode_speech_sample(s, 16, dedup=False, verify_audio="full"),
                                policy))
    assert len(records) == len(clips) and policy.total == 0
    extractor = UnitExtractor.load(extractor_dir)
    for rec, sample in zip(records, samples_of(out, m)):
        wave, _, _ = decode(sample["flac"])
        # units were computed from the float waveform before FLAC quantisation: allow a rare boundary flip
        expected = extractor(torch.from_numpy(wave)).tolist()
        assert len(rec.units) == len(expected)
        assert np.mean(np.array(rec.units) == np.array(expected)) > 0.95


# ================================================================================================ LibriHeavy
def test_libriheavy_cuts_manifest_segments_and_original_text(tmp_path, clips):
    manifest_path = write_libriheavy(tmp_path / "in", "small", clips)
    assert manifest_path.name == "libriheavy_cuts_small.jsonl.gz" and manifest_path.read_bytes()[:2] == b"\x1f\x8b"
    out = tmp_path / "out"
    m = prep("libriheavy", manifest_path, "--audio-root", tmp_path / "in", "--out", out)
    check_manifest_integrity(out, m)
    assert list(m["splits"]) == ["small"]
    samples = samples_of(out, m)
    assert len(samples) == len(clips)
    for s, clip in zip(samples, clips):  # cuts keep manifest order
        meta = json.loads(s["json"])
        assert meta["text"] == clip.text  # custom.texts[0], cased and punctuated (texts[1] is upper case)
        assert s["txt"].decode() == normalize_transcript(clip.text)
        wave, rate, _ = decode(s["flac"])
        assert rate == 16000 and np.array_equal(wave, pcm16(clip.wave).astype(np.float32))  # exact segment
        assert meta["start"] > 0 and "/" in meta["id"] and "/" not in s["__key__"]


# ================================================================================================ Common Voice
def test_commonvoice_tsv_and_real_mp3(tmp_path, clips):
    lang = write_commonvoice(tmp_path / "cv" / "en", {"train": clips[:5], "dev": clips[5:]})
    assert (lang / "train.tsv").read_text().split("\n")[0].split("\t")[:4] == \
        ["client_id", "path", "sentence_id", "sentence"]
    mp3 = next((lang / "clips").glob("*.mp3"))
    assert sf.info(mp3).format == "MP3" and sf.info(mp3).samplerate == 48000
    out = tmp_path / "out"
    rows = {r.split("\t")[1]: r.split("\t") for r in (lang / "train.tsv").read_text().splitlines()[1:]}
    m = prep("commonvoice", lang, "--out", out)
    check_manifest_integrity(out, m)
    assert {k: v["samples"] for k, v in m["splits"].items()} == {"train": 5, "dev": 3}
    assert m["bad_inputs"]["fixed"] == {"resampled": 8}
    for s in samples_of(out, m, "train"):
        meta = json.loads(s["json"])
        clip = clips[SENTENCES.index(meta["text"])]
        wave, rate, _ = decode(s["flac"])
        assert rate == 16000 and meta["source_sample_rate"] == 48000
        assert abs(len(wave) - len(clip.wave)) < 0.06 * 16000  # MP3 frame padding, at most ~1 frame each side
        # the decoded speech is the original speech: high correlation at the best small lag
        n = min(len(wave), len(clip.wave)) - 2000
        best = max(np.corrcoef(wave[lag:lag + n], clip.wave[:n])[0, 1] for lag in range(0, 1200, 8))
        assert best > 0.9
        row = rows[meta["id"]]
        assert (meta["speaker"], meta["gender"], meta["age"], meta["sentence_id"]) == (row[0], row[8], row[7], row[2])


def test_commonvoice_sentence_with_quotes_is_kept_verbatim(tmp_path, clips):
    quoted = Clip('He said "stop" and left.', clips[0].wave)
    lang = write_commonvoice(tmp_path / "en", {"train": [quoted]})
    m = prep("commonvoice", lang / "train.tsv", "--out", tmp_path / "out")
    assert json.loads(samples_of(tmp_path / "out", m)[0]["json"])["text"] == 'He said "stop" and left.'


# ================================================================================================ VoxPopuli
@pytest.mark.parametrize("ext", ["ogg", "wav"])
def test_voxpopuli_tsv_and_year_layout(tmp_path, clips, ext):
    lang = write_voxpopuli(tmp_path / "vp" / "en", {"train": clips[:6], "dev": clips[6:]}, ext=ext)
    assert sf.info(next(lang.glob(f"2018/*.{ext}"))).format == ext.upper()
    out = tmp_path / "out"
    m = prep("voxpopuli", lang, "--out", out)
    check_manifest_integrity(out, m)
    assert {k: v["samples"] for k, v in m["splits"].items()} == {"train": 6, "dev": 2}
    for s in samples_of(out, m):
        meta = json.loads(s["json"])
        clip = clips[SENTENCES.index(meta["text"])]
        wave, rate, _ = decode(s["flac"])
        assert rate == 16000 and abs(len(wave) - len(clip.wave)) < 200
        assert ":" in meta["id"] and ":" not in s["__key__"] and "." not in s["__key__"]
        assert meta["normalized_text"] and meta["speaker"].startswith("100")


# ================================================================================================ text
def test_text_parquet_refinedweb_content_and_jsonl_gz(tmp_path):
    docs = ["First web page.\nWith two lines.", "Second page: numbers 1, 2, 3.", "Third"]
    write_parquet(tmp_path / "train-00000-of-00002.parquet", refinedweb_rows(docs))
    out = tmp_path / "out"
    m = prep("text", tmp_path / "train-00000-of-00002.parquet", "--text-field", "content", "--meta-fields", "url",
             "--out", out, "--shard-size", "2")
    check_manifest_integrity(out, m)
    samples = samples_of(out, m, "train")
    assert [s["txt"].decode() for s in samples] == docs  # kept as written
    assert [json.loads(s["json"])["url"] for s in samples] == [f"https://example.org/{i}" for i in range(3)]
    write_jsonl_gz(tmp_path / "docs.jsonl.gz", [{"text": d} for d in docs])
    m2 = prep("text", tmp_path / "docs.jsonl.gz", "--out", tmp_path / "out2", "--normalize", "--split", "valid")
    assert [s["txt"].decode() for s in samples_of(tmp_path / "out2", m2, "valid")] == \
        [normalize_transcript(d) for d in docs]


def test_text_field_missing_is_a_clear_error(tmp_path, capsys):
    write_parquet(tmp_path / "x.parquet", refinedweb_rows(["a b c"]))
    assert main(["text", str(tmp_path / "x.parquet"), "--out", str(tmp_path / "o"), "--num-workers", "1"]) == 2
    assert "no column(s) ['text']" in capsys.readouterr().err


# ================================================================================================ chat
DIALOGUES = [[("system", "Be brief."), ("user", "What is a gravel road?"), ("assistant", "A road made of stones.")],
             [("user", "Say hello."), ("assistant", "Hello!"), ("user", "Thanks."), ("assistant", "You are welcome.")]]


def test_chat_text_only(tmp_path):
    write_parquet(tmp_path / "train-00000-of-00001.parquet", smoltalk_rows(DIALOGUES))
    out = tmp_path / "out"
    m = prep("chat", tmp_path / "train-00000-of-00001.parquet", "--out", out)
    samples = samples_of(out, m, "train")
    assert len(samples) == 2 and m["hours"] == 0
    for s, d in zip(samples, DIALOGUES):
        assert sorted(k for k in s if not k.startswith("__")) == ["json", "messages.json"]
        messages = json.loads(s["messages.json"])
        assert messages == [{"role": r, "text": t, "audio": None, "units": None} for r, t in d]
        meta = json.loads(s["json"])
        assert (meta["source"], meta["split"], meta["n_turns"], meta["origin"]) == \
            ("chat", "train", len(d), "smol-magpie-ultra")


def test_chat_speech_rendering_with_flite_and_units(tmp_path, extractor_dir):
    write_jsonl_gz(tmp_path / "smoltalk.jsonl.gz", smoltalk_rows(DIALOGUES))
    out = tmp_path / "out"
    m = prep("chat", tmp_path / "smoltalk.jsonl.gz", "--out", out, "--tts", "flite", "--speak-roles", "user",
             "--units", extractor_dir)
    extractor = UnitExtractor.load(extractor_dir)
    seconds = 0.0
    for s, d in zip(samples_of(out, m), DIALOGUES):
        messages = json.loads(s["messages.json"])
        for i, (msg, (role, text)) in enumerate(zip(messages, d)):
            assert (msg["role"], msg["text"]) == (role, text)
            if role != "user":
                assert msg["audio"] is None and msg["units"] is None
                continue
            assert (msg["audio"], msg["units"]) == (f"turn{i}.flac", f"turn{i}.units.npy")
            wave, rate, channels = decode(s[msg["audio"]])
            assert (rate, channels) == (16000, 1) and 0.3 < len(wave) / 16000 < 0.2 * len(text)
            units = np.load(io.BytesIO(s[msg["units"]]), allow_pickle=False)
            assert units.dtype == np.int16 and len(units) == len(extractor(torch.from_numpy(wave)))
            seconds += len(wave) / 16000
        assert json.loads(s["json"])["tts"].startswith("flite")
    assert m["hours"] == pytest.approx(seconds / 3600, rel=1e-3)


def test_demo_chat_builds_smoltalk_jsonl_and_prepares_it(tmp_path):
    out = tmp_path / "demo_chat"
    m = prep("demo_chat", "--out", out, "--n-train", "6", "--n-val", "2", "--tts", "none")
    lines = (out / "source" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 6
    row = json.loads(lines[0])
    assert [t["role"] for t in row["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    word = row["messages"][1]["content"].split('"')[1]
    assert word.lower() in row["messages"][4]["content"].lower()  # the example sentence uses the word
    assert {k: v["samples"] for k, v in m["splits"].items()} == {"train": 6, "validation": 2}
    again = prep("demo_chat", "--out", tmp_path / "again", "--n-train", "6", "--n-val", "2", "--tts", "none")
    assert again["splits"] == m["splits"]  # same WordNet, same seed -> same shards


# ================================================================================================ sizes
def test_shard_size_parsing_and_planning_by_bytes():
    assert writer.ShardTarget.parse("500") == writer.ShardTarget(samples=500)
    assert writer.ShardTarget.parse("64MB") == writer.ShardTarget(bytes=64_000_000)
    assert writer.ShardTarget.parse("0.5gb") == writer.ShardTarget(bytes=500_000_000)
    for bad in ("0", "1.5", "64XB", ""):
        with pytest.raises(ValueError, match="shard size"):
            writer.ShardTarget.parse(bad)
    items = [TextItem(f"k{i}", "x", {}, est_bytes=b) for i, b in enumerate([40, 40, 30, 100, 10, 10])]
    jobs = writer.plan_shards({"train": items}, writer.ShardTarget(bytes=100))
    assert [[i.key for i in j.items] for j in jobs] == [["k0", "k1"], ["k2"], ["k3"], ["k4", "k5"]]
    assert [j.name for j in jobs] == [f"train-{i:05d}.tar" for i in range(4)]


def test_shard_size_in_bytes_end_to_end(tmp_path, clips):
    write_librispeech(tmp_path / "in", "dev-clean", clips)
    m = prep("librispeech", tmp_path / "in" / "LibriSpeech", "--out", tmp_path / "out", "--shard-size", "100KB")
    shards = m["splits"]["dev-clean"]["shards"]
    assert len(shards) >= 3 and sum(s["samples"] for s in shards) == len(clips)
    assert all(s["bytes"] < 200_000 or s["samples"] == 1 for s in shards)


# ================================================================================================ determinism
def test_deterministic_across_runs_and_worker_counts(tmp_path, clips):
    write_librispeech(tmp_path / "in", "dev-clean", clips)
    src = tmp_path / "in" / "LibriSpeech"
    prep("librispeech", src, "--out", tmp_path / "a", "--shard-size", "2")
    assert run(["librispeech", str(src), "--out", str(tmp_path / "b"), "--shard-size", "2", "--num-workers", "2",
                "--no-progress"]) is not None
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert len(names) == 4 and names == sorted(p.name for p in (tmp_path / "b").glob("*.tar"))
    for name in names + ["manifest.json", "skipped.tsv"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# ================================================================================================ resume
def _shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}


def test_resume_after_injected_failure_redoes_only_unfinished_shards(tmp_path, clips, monkeypatch):
    write_librispeech(tmp_path / "in", "dev-clean", clips)
    src = tmp_path / "in" / "LibriSpeech"
    prep("librispeech", src, "--out", tmp_path / "clean", "--shard-size", "2")
    out = tmp_path / "out"
    real_build, built = writer.build_sample, []

    def failing_build(item, opts, fixed):
        if len(built) == 5:  # the first item of the third shard: shards 0 and 1 are finished
            raise RuntimeError("injected crash")
        built.append(item.key)
        return real_build(item, opts, fixed)

    monkeypatch.setattr(writer, "build_sample", failing_build)
    with pytest.raises(RuntimeError, match="injected crash"):
        prep("librispeech", src, "--out", out, "--shard-size", "2")
    assert not (out / "manifest.json").exists()
    finished = _shard_stats(out)
    assert sorted(finished) == ["dev-clean-00000.tar", "dev-clean-00001.tar"]
    monkeypatch.setattr(writer, "build_sample", real_build)
    written = []
    real_write = writer.write_shard
    monkeypatch.setattr(writer, "write_shard", lambda job, *a: written.append(job.name) or real_write(job, *a))
    prep("librispeech", src, "--out", out, "--shard-size", "2")
    assert written == ["dev-clean-00002.tar", "dev-clean-00003.tar"]
    assert {k: v for k, v in _shard_stats(out).items() if k in finished} == finished  # untouched
    assert not list(out.glob("*.partial"))
    for name in ["manifest.json"] + sorted(p.name for p in (tmp_path / "clean").glob("*.tar")):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


def test_max_new_shards_then_continue_and_plan_mismatch(tmp_path, clips):
    write_librispeech(tmp_path / "in", "dev-clean", clips)
    src, out = tmp_path / "in" / "LibriSpeech", tmp_path / "out"
    assert run(["librispeech", str(src), "--out", str(out), "--shard-size", "2", "--max-new-shards", "1",
                "--num-workers", "1", "--no-progress"]) is None
    assert [p.name for p in out.glob("*.tar")] == ["dev-clean-00000.tar"]
    m = prep("librispeech", src, "--out", out, "--shard-size", "2")
    assert len(m["splits"]["dev-clean"]["shards"]) == 4
    assert prep("librispeech", src, "--out", out, "--shard-size", "2") == m  # finished: nothing redone
    with pytest.raises(writer.PlanMismatchError, match="--overwrite"):
        prep("librispeech", src, "--out", out, "--shard-size", "3")
    m3 = prep("librispeech", src, "--out", out, "--shard-size", "3", "--overwrite")
    assert sorted(p.name for p in out.glob("*.tar")) == [f"dev-clean-0000{i}.tar" for i in range(3)]
    check_manifest_integrity(out, m3)


@pytest.mark.slow
def test_resume_after_sigkill_of_a_real_run(tmp_path, clips):
    """SIGKILL a CLI run (speech rendering keeps it busy for seconds) once it has finished shards; rerun."""
    dialogues = [[("user", f"Please say the sentence number {i}."), ("assistant", SENTENCES[i % 8])]
                 for i in range(24)]
    write_jsonl_gz(tmp_path / "chat.jsonl.gz", smoltalk_rows(dialogues))
    args = ["chat", str(tmp_path / "chat.jsonl.gz"), "--tts", "flite", "--shard-size", "2", "--num-workers", "1",
            "--no-progress"]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "most_lightning.data.prepare", *args, "--out", str(out)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "progress.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and len(progress.read_text().splitlines()) >= 3:  # header + 2 shards
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    finished = {json.loads(l)["name"] for l in progress.read_text().splitlines()[1:]}
    assert 2 <= len(finished) < 12
    before = _shard_stats(out)
    m = run([*args, "--out", str(out)])
    assert {k: v for k, v in _shard_stats(out).items() if k in finished} == {k: before[k] for k in finished}
    clean = run([*args, "--out", str(tmp_path / "clean")])
    assert m == clean
    for shard in m["splits"]["train"]["shards"]:
        assert (out / shard["path"]).read_bytes() == (tmp_path / "clean" / shard["path"]).read_bytes()


# ================================================================================================ bad inputs
def _corrupt_librispeech(root: Path, clips: list[Clip]) -> dict[str, str]:
    """Good corpus plus one utterance per bad kind in chapter 19/1999; returns key -> expected outcome."""
    write_librispeech(root, "dev-clean", clips[:4])
    d = root / "LibriSpeech" / "dev-clean" / "19" / "1999"
    d.mkdir(parents=True)
    good = clips[4].wave
    flac = io.BytesIO()
    sf.write(flac, good, 16000, format="FLAC")
    (d / "19-1999-0000.flac").write_bytes(b"fLaC" + bytes(range(256)) * 8)  # garbage after the magic
    (d / "19-1999-0001.flac").write_bytes(flac.getvalue()[: len(flac.getvalue()) // 2])  # truncated
    # 19-1999-0002: no audio file
    sf.write(d / "19-1999-0003.flac", good, 16000)  # empty transcript
    sf.write(d / "19-1999-0004.flac", good, 16000)  # non-UTF-8 transcript
    sf.write(d / "19-1999-0005.flac", clips[5].wave[::2], 8000)  # wrong sample rate: resampled
    sf.write(d / "19-1999-0006.flac", np.stack([good, 0.5 * good], axis=1), 16000)  # stereo: downmixed
    (d / "19-1999.trans.txt").write_bytes(
        b"19-1999-0000 GARBAGE AUDIO\n19-1999-0001 TRUNCATED AUDIO\n19-1999-0002 NO AUDIO FILE\n"
        b"19-1999-0003 \n19-1999-0004 CAF\xe9 LATIN ONE\n19-1999-0005 LOW RATE\n19-1999-0006 TWO CHANNELS\n")
    return {"19-1999-0000": "undecodable_audio", "19-1999-0001": "undecodable_audio",
            "19-1999-0002": "missing_audio", "19-1999-0003": "empty_transcript",
            "19-1999-0004": "non_utf8_transcript", "19-1999-0005": "resampled", "19-1999-0006": "downmixed"}


def test_bad_librispeech_inputs_are_counted_named_and_skipped(tmp_path, clips, caplog):
    expected = _corrupt_librispeech(tmp_path / "in", clips)
    chapter = tmp_path / "in" / "LibriSpeech" / "dev-clean" / "19" / "1999"
    shutil.copy(chapter / "19-1999-0005.flac", chapter / "19-1999-0099.flac")  # audio its trans.txt does not list
    expected["19-1999-0099"] = "no_transcript"
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="most_lightning.data.prepare"):
        m = prep("librispeech", tmp_path / "in" / "LibriSpeech", "--out", out)
    assert m["bad_inputs"]["skipped"] == {"empty_transcript": 1, "missing_audio": 1, "no_transcript": 1,
                                          "non_utf8_transcript": 1, "undecodable_audio": 2}
    assert m["bad_inputs"]["fixed"] == {"downmixed": 1, "resampled": 1}
    assert m["samples"] == 4 + 2
    skipped = [l.split("\t") for l in (out / "skipped.tsv").read_text().splitlines()[1:]]
    assert sorted((k, r) for _, k, r, _ in skipped) == sorted((k, r) for k, r in expected.items()
                                                              if r not in ("resampled", "downmixed"))
    for key, reason in expected.items():
        if reason not in ("resampled", "downmixed"):
            assert any(key in rec.getMessage() and reason in rec.getMessage() for rec in caplog.records), key
    by_key = {s["__key__"]: s for s in samples_of(out, m)}
    wave, rate, channels = decode(by_key["19-1999-0006"]["flac"])
    assert (rate, channels) == (16000, 1)
    assert np.allclose(wave, pcm16(pcm16(clips[4].wave) * 0.75), atol=2 / 32768)  # mean of (x, 0.5 x)
    wave, rate, _ = decode(by_key["19-1999-0005"]["flac"])
    assert rate == 16000 and len(wave) == 2 * len(clips[5].wave[::2])
    meta = json.loads(by_key["19-1999-0005"]["json"])
    assert meta["source_sample_rate"] == 8000 and meta["sample_rate"] == 16000


@pytest.mark.parametrize("key,reason", [("19-1999-0000", "undecodable_audio"), ("19-1999-0002", "missing_audio"),
                                        ("19-1999-0003", "empty_transcript"),
                                        ("19-1999-0004", "non_utf8_transcript")])
def test_bad_input_with_raise_policy_stops_naming_it(tmp_path, clips, key, reason, capsys):
    _corrupt_librispeech(tmp_path / "in", clips)
    d = tmp_path / "in" / "LibriSpeech" / "dev-clean" / "19" / "1999"
    trans = d / "19-1999.trans.txt"
    trans.write_bytes(b"".join(l + b"\n" for l in trans.read_bytes().splitlines() if l.startswith(key.encode())))
    for other in d.glob("*.flac"):  # unlisted audio would itself stop the run (no_transcript)
        if other.stem != key:
            other.unlink()
    with pytest.raises(BadInputError) as info:
        prep("librispeech", tmp_path / "in" / "LibriSpeech", "--out", tmp_path / "out", "--on-bad", "raise")
    assert info.value.key == key and info.value.reason == reason and "--on-bad skip" in str(info.value)
    assert main(["librispeech", str(tmp_path / "in" / "LibriSpeech"), "--out", str(tmp_path / "o2"),
                 "--on-bad", "raise", "--num-workers", "2"]) == 2  # also through worker processes
    err = capsys.readouterr().err
    assert key in err and reason in err


def test_bad_commonvoice_mp3_and_rows(tmp_path, clips):
    lang = write_commonvoice(tmp_path / "en", {"train": clips[:3]})
    (lang / "clips" / "common_voice_en_40000002.mp3").write_bytes(b"ID3\x04\x00\x00" + bytes(range(256)) * 16)
    with open(lang / "train.tsv", "a") as f:
        f.write("\t".join(["c", "common_voice_en_9.mp3", "s", "A missing clip.", "", "2", "0", "", "", "", "", "en",
                           ""]) + "\n")
        f.write("too\tfew\tcolumns\n")
    m = prep("commonvoice", lang / "train.tsv", "--out", tmp_path / "out")
    assert m["bad_inputs"]["skipped"] == {"bad_index_row": 1, "missing_audio": 1, "undecodable_audio": 1}
    assert m["samples"] == 2


def test_bad_libriheavy_cuts(tmp_path, clips):
    path = write_libriheavy(tmp_path / "in", "dev", clips[:3], per_recording=3)
    import gzip

    cuts = [json.loads(l) for l in gzip.open(path, "rt")]
    missing = json.loads(json.dumps(cuts[0]))
    missing["id"] += "_missing"
    missing["recording"]["sources"][0]["source"] = "download/librilight/dev/nowhere.flac"
    beyond = json.loads(json.dumps(cuts[1]))
    beyond["id"] += "_beyond"
    beyond["start"] = cuts[2]["start"] + 60.0
    no_text = json.loads(json.dumps(cuts[2]))
    no_text["id"] += "_notext"
    no_text["supervisions"][0]["custom"]["texts"] = ["  "]
    url = json.loads(json.dumps(cuts[2]))
    url["id"] += "_url"
    url["recording"]["sources"] = [{"type": "url", "channels": [0], "source": "https://example.org/a.flac"}]
    write_jsonl_gz(path, cuts + [missing, beyond, no_text, url])
    with gzip.open(path, "at") as f:
        f.write("{not json\n")
    m = prep("libriheavy", path, "--audio-root", tmp_path / "in", "--out", tmp_path / "out")
    assert m["bad_inputs"]["skipped"] == {"bad_index_row": 1, "empty_transcript": 1, "missing_audio": 1,
                                          "segment_out_of_range": 1, "unsupported_source": 1}
    assert m["samples"] == 3


def test_bad_chats_and_texts(tmp_path):
    rows = smoltalk_rows(DIALOGUES + [[("user", "Hi"), ("assistant", "   ")], [("user", "Hi"), ("robot", "Beep")]])
    rows.append({"conversation": []})
    write_jsonl_gz(tmp_path / "c.jsonl.gz", rows)
    m = prep("chat", tmp_path / "c.jsonl.gz", "--out", tmp_path / "out")
    assert m["bad_inputs"]["skipped"] == {"bad_index_row": 1, "bad_role": 1, "empty_turn": 1}
    assert m["samples"] == 2
    with pytest.raises(BadInputError, match="empty_turn.*turn 1 \\(assistant\\)"):
        prep("chat", tmp_path / "c.jsonl.gz", "--out", tmp_path / "o2", "--on-bad", "raise")
    (tmp_path / "t.jsonl").write_text('{"text": "fine"}\n{"text": ""}\n{"text": "bad \\udcff byte"}\n')
    m = prep("text", tmp_path / "t.jsonl", "--out", tmp_path / "o3")
    assert m["bad_inputs"]["skipped"] == {"empty_text": 1, "non_utf8_transcript": 1} and m["samples"] == 1


def test_chat_units_without_speech_is_a_clear_error(tmp_path, extractor_dir, capsys):
    write_jsonl_gz(tmp_path / "c.jsonl.gz", smoltalk_rows(DIALOGUES))
    assert main(["chat", str(tmp_path / "c.jsonl.gz"), "--out", str(tmp_path / "o"), "--units",
                 str(extractor_dir)]) == 2
    assert "--tts flite" in capsys.readouterr().err


def test_nothing_usable_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text('{"text": ""}\n')
    assert main(["text", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "o"), "--num-workers", "1"]) == 2
    assert "nothing to prepare" in capsys.readouterr().err


def test_cli_help_lists_every_source():
    proc = subprocess.run([sys.executable, "-m", "most_lightning.data.prepare", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0
    for source in ("librispeech", "libriheavy", "commonvoice", "voxpopuli", "text", "chat", "demo_chat"):
        assert source in proc.stdout


def test_refuses_to_write_over_foreign_shards(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "one"}\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-00000.tar").write_bytes(b"someone else's shard")
    with pytest.raises(writer.PlanMismatchError, match="not written by a preparation"):
        prep("text", tmp_path / "t.jsonl", "--out", out)
    assert (out / "train-00000.tar").read_bytes() == b"someone else's shard"
    m = prep("text", tmp_path / "t.jsonl", "--out", out, "--overwrite")
    check_manifest_integrity(out, m)


def test_any_prepared_corpus_serves_as_an_eval_split(tmp_path, tmp_path_factory, clips):
    """A LibriSpeech preparation with the demo corpus' unit extractor is read as a test split by shard glob:
    transcripts and units as the preparer wrote them (what `eval.tasks.asr.split=<glob>` reads)."""
    from most_lightning.data.datamodule import MoSTDataModule
    from most_lightning.data.testing import TINY_RECIPE, build_tiny_corpus

    corpus = build_tiny_corpus(tmp_path_factory.getbasetemp() / "most_data_corpus")
    write_librispeech(tmp_path / "in", "test-clean", clips)
    out = tmp_path / "prepared"
    m = prep("librispeech", tmp_path / "in" / "LibriSpeech", "--out", out, "--units", corpus / "unit_extractor")
    dm = MoSTDataModule.from_settings(data_dir=str(corpus.parent.parent), corpus=TINY_RECIPE, progress=False)
    records, n_skipped = dm.speech_records(str(out / "*.tar"))
    written = {s["__key__"]: s for s in samples_of(out, m)}
    assert n_skipped == 0 and sorted(r.key for r in records) == sorted(written)
    for rec in records:
        assert rec.transcript == written[rec.key]["txt"].decode()
        units = np.load(io.BytesIO(written[rec.key]["units.npy"])).tolist()
        assert rec.units == [u for i, u in enumerate(units) if i == 0 or u != units[i - 1]]  # deduplicated
    assert dm.shards("test") != dm.shards(str(out / "*.tar"))  # a split name still means the corpus' own split
