"""Demo corpus: WordNet sentences, split disjointness, shard contents, cache hit / rebuild, missing flite."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from most_lightning.audio import UnitExtractor, read_audio
from most_lightning.data import demo_corpus as dc
from most_lightning.data.demo_corpus import DemoCorpusRecipe, build_demo_corpus, is_built, load_manifest
from most_lightning.data.flite import FliteNotFoundError
from most_lightning.data.testing import TINY_RECIPE, build_tiny_corpus, read_shard
from most_lightning.data.text_sources import normalize_transcript, wordnet_sentences
from most_lightning.text import MoSTTokenizer


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory):
    return build_tiny_corpus(tmp_path_factory.getbasetemp() / "most_data_corpus")


def test_normalize_transcript():
    assert normalize_transcript("Hard-surface roads.") == "hard surface roads"
    assert normalize_transcript("She's away; 'right now'!") == "she's away right now"


def test_wordnet_sentences_are_clean_and_unique():
    sentences = wordnet_sentences(min_words=3, max_words=20)
    assert len(sentences) > 30_000  # room for a 20k-sentence corpus plus held-out splits
    transcripts = [normalize_transcript(s) for s in sentences]
    assert len(set(transcripts)) == len(transcripts)
    assert all(s.isascii() and not any(c.isdigit() or c in '"()' for c in s) for s in sentences)
    assert all(3 <= len(t.split()) <= 20 for t in transcripts)


def test_held_out_sentences_do_not_move_when_train_grows():
    small = dc.select_sentences(DemoCorpusRecipe(n_train=10, n_text=10))
    big = dc.select_sentences(DemoCorpusRecipe(n_train=500, n_text=300))
    assert small["test"] == big["test"] and small["validation"] == big["validation"]
    assert big["train"][:10] == small["train"]


def test_too_many_sentences_is_a_clear_error():
    with pytest.raises(ValueError, match="lower n_text or n_train"):
        dc.select_sentences(DemoCorpusRecipe(n_train=60_000))


def test_recipe_hash_tracks_content_not_location():
    base = DemoCorpusRecipe()
    assert base.hash() == DemoCorpusRecipe(voices=["slt", "rms", "awb", "kal16"]).hash()  # list == tuple
    assert base.hash() == DemoCorpusRecipe(wordnet_dir="/elsewhere").hash()
    for change in (dict(seed=1), dict(n_train=999), dict(voices=("slt",)), dict(n_units=100),
                   dict(mfcc={"frame_stack": 1}), dict(version=999)):
        assert DemoCorpusRecipe(**change).hash() != base.hash(), change
    assert DemoCorpusRecipe.from_any({"n_train": 5, "_target_": "x"}).n_train == 5
    with pytest.raises(ValueError, match="voices_per_sentence"):
        DemoCorpusRecipe(voices_per_sentence=5)


def test_manifest_counts_and_checksums(tiny_corpus_dir):
    m = load_manifest(tiny_corpus_dir)
    r = TINY_RECIPE
    assert m["recipe"] == r.canonical() and m["n_units"] == r.n_units and m["sample_rate"] == 16000
    assert {k: m["speech"][k]["utterances"] for k in m["speech"]} == {"train": r.n_train, "validation": r.n_val,
                                                                      "test": r.n_test}
    assert m["text"]["sentences"] == r.n_text and m["speech"]["train"]["hours"] > 0
    for entry in [*m["speech"]["train"]["shards"], *m["text"]["shards"]]:
        data = (tiny_corpus_dir / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert not (tiny_corpus_dir / ".work").exists()


def _transcripts(corpus_dir, split):
    m = load_manifest(corpus_dir)
    entry = m["text"] if split == "text" else m["speech"][split]
    return [s["txt"].decode() for sh in entry["shards"] for s in read_shard(corpus_dir / sh["path"])]


def test_splits_are_disjoint_by_sentence(tiny_corpus_dir):
    sets = {s: _transcripts(tiny_corpus_dir, s) for s in ("train", "validation", "test", "text")}
    for name, items in sets.items():
        assert len(set(items)) == len(items), name
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(sets[a]) & set(sets[b]), (a, b)


def test_speech_samples_hold_audio_transcript_units_and_metadata(tiny_corpus_dir):
    m = load_manifest(tiny_corpus_dir)
    extractor = UnitExtractor.load(tiny_corpus_dir / "unit_extractor")
    sample = read_shard(tiny_corpus_dir / m["speech"]["test"]["shards"][0]["path"])[0]
    assert set(sample) == {"__key__", "flac", "txt", "json", "units.npy"}
    wave, rate = read_audio(sample["flac"], target_sample_rate=None)
    meta = json.loads(sample["json"])
    assert rate == 16000 and meta["sample_rate"] == 16000 and meta["split"] == "test"
    assert meta["voice"] in TINY_RECIPE.voices and abs(meta["duration"] - wave.numel() / 16000) < 1e-3
    assert normalize_transcript(meta["text"]) == sample["txt"].decode()
    units = np.load(__import__("io").BytesIO(sample["units.npy"]), allow_pickle=False)
    assert units.ndim == 1 and 0 <= units.min() and units.max() < TINY_RECIPE.n_units
    # the saved extractor reproduces the stored units from the stored (16-bit) audio up to FLAC rounding
    again = extractor(wave).numpy()
    assert len(again) == len(units) and (again == units).mean() > 0.9
    tok = MoSTTokenizer.load(tiny_corpus_dir / "tokenizer")
    assert tok.n_units == TINY_RECIPE.n_units and tok.vocab_size == m["vocab_size"]


def test_second_build_is_a_cache_hit(tiny_corpus_dir, monkeypatch):
    stamp = (tiny_corpus_dir / "manifest.json").stat().st_mtime_ns

    def no_synthesis(*args, **kwargs):
        raise AssertionError("a cached corpus must not be rebuilt")

    monkeypatch.setattr(dc, "synthesize_shard", no_synthesis)
    monkeypatch.setattr(dc, "_run_synthesis", no_synthesis)
    assert build_tiny_corpus(tiny_corpus_dir.parent.parent) == tiny_corpus_dir
    assert (tiny_corpus_dir / "manifest.json").stat().st_mtime_ns == stamp


MICRO = dict(n_train=6, n_val=1, n_test=1, n_text=3, n_units=8, text_vocab_size=270, shard_size=3,
             kmeans_max_frames=5000)


def test_recipe_change_builds_a_new_corpus_and_resumes_work(tmp_path, monkeypatch):
    first = DemoCorpusRecipe(**MICRO)
    d1 = build_demo_corpus(first, tmp_path, num_workers=1, progress=False)
    second = DemoCorpusRecipe(**{**MICRO, "seed": 1})
    assert not is_built(second, tmp_path)
    # an interrupted build keeps finished work shards: fail after the first shard, then resume
    real = dc.synthesize_shard
    calls = []

    def flaky(job):
        calls.append(job[3])
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(job)

    monkeypatch.setattr(dc, "synthesize_shard", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_demo_corpus(second, tmp_path, num_workers=1, progress=False)
    monkeypatch.setattr(dc, "synthesize_shard", lambda job: calls.append(job[3]) or real(job))
    d2 = build_demo_corpus(second, tmp_path, num_workers=1, progress=False)
    assert d2 != d1 and is_built(first, tmp_path) and is_built(second, tmp_path)
    assert calls[0] not in calls[2:]  # the shard finished before the crash was not spoken again
    assert _transcripts(d1, "test") != _transcripts(d2, "test")  # another seed, other sentences


def test_missing_flite_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no flite here
    with pytest.raises(FliteNotFoundError, match="apt-get install flite"):
        build_demo_corpus(DemoCorpusRecipe(**MICRO, seed=7), tmp_path / "data", progress=False)
    assert not (tmp_path / "data" / "demo" / DemoCorpusRecipe(**MICRO, seed=7).hash() / "manifest.json").exists()


def test_cli_help_and_print_dir(tmp_path, capsys):
    out = subprocess.run([sys.executable, "-m", "most_lightning.data.demo_corpus", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--n-train" in out and "--voices" in out
    assert dc.main(["--data-dir", str(tmp_path), "--n-train", "123", "--voices", "slt,rms", "--print-dir"]) == 0
    expected = tmp_path / "demo" / DemoCorpusRecipe(n_train=123, voices=("slt", "rms")).hash()
    assert capsys.readouterr().out.strip() == str(expected)
    assert dc.main(["--data-dir", str(tmp_path), "--unit-model", "phone_classifier", "--cmvn", "utterance",
                    "--mfcc", '{"hop_length": 320, "frame_stack": 2}', "--phone-classifier", '{"context": 8}',
                    "--print-dir"]) == 0
    recipe = DemoCorpusRecipe(unit_model="phone_classifier", phone_classifier={"context": 8},
                              mfcc={"cmvn": "utterance", "hop_length": 320, "frame_stack": 2})
    assert capsys.readouterr().out.strip() == str(tmp_path / "demo" / recipe.hash())


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_build_from_a_script_without_main_guard_fails_instead_of_hanging(tmp_path):
    """Spawned synthesis workers import the calling script; without the guard each would start the build again
    and wait forever on the build lock. The worker now stops with the fix, and the parent reports the dead worker."""
    script = tmp_path / "build_unguarded.py"
    script.write_text("import sys\nfrom most_lightning.data.demo_corpus import DemoCorpusRecipe, build_demo_corpus\n"
                      f"build_demo_corpus(DemoCorpusRecipe(**{MICRO!r}), sys.argv[1], num_workers=2, progress=False)\n")
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "data")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    assert 'put that call under `if __name__ == "__main__":`' in run.stderr
    assert "a flite synthesis worker died before finishing its shard" in run.stderr


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_parallel_synthesis_writes_the_same_corpus_as_one_worker(tmp_path):
    one = build_demo_corpus(DemoCorpusRecipe(**MICRO), tmp_path / "one", num_workers=1, progress=False)
    two = build_demo_corpus(DemoCorpusRecipe(**MICRO), tmp_path / "two", num_workers=2, progress=False)

    def samples(corpus):  # member bytes per sample key (the tar headers carry write times)
        return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
                for split in load_manifest(corpus)["speech"].values() for shard in split["shards"]
                for s in read_shard(corpus / shard["path"])}

    assert samples(one) == samples(two) and len(samples(one)) == 8
