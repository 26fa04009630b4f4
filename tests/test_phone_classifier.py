"""Phone-classifier units: context stacking against a hand-written loop, fitting against the Bayes classifier of
synthetic phones, save/load round trips through UnitExtractor, bad input, and a demo corpus built with them."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
import torch

from most_lightning.audio import UnitExtractor, read_audio
from most_lightning.audio.features import MFCCEncoder
from most_lightning.audio.phone_classifier import PhoneClassifierQuantizer, best_phone_path, stack_context
from most_lightning.audio.quality import frame_phones
from most_lightning.audio.quantizer import KMeansQuantizer, QuantizerFileError
from most_lightning.data.demo_corpus import DemoCorpusRecipe, build_demo_corpus, load_manifest
from most_lightning.data.testing import read_shard

PHONES = ["b", "aa", "s"]  # sorted inventory: aa=0, b=1, s=2


def test_stack_context_matches_a_loop_with_repeated_edges():
    x = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    got = stack_context(x, 2)
    for i in range(5):
        expected = torch.cat([x[min(max(j, 0), 4)] for j in range(i - 2, i + 3)])
        assert torch.equal(got[i], expected)
    assert torch.equal(stack_context(x, 0), x)


@pytest.mark.parametrize("penalty", [0.5, 1.5, 4.0])
def test_best_phone_path_is_the_best_of_all_paths(penalty):
    """Against brute force: every one of the 3^6 phone paths scored as sum of log-probs - penalty * changes."""
    for seed in range(5):
        log_probs = torch.log_softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(seed)), dim=1)
        score = lambda path: (sum(float(log_probs[t, p]) for t, p in enumerate(path))  # noqa: E731
                              - penalty * sum(a != b for a, b in zip(path, path[1:])))
        best = max(itertools.product(range(3), repeat=6), key=score)
        got = best_phone_path(log_probs, penalty).tolist()
        assert score(got) == pytest.approx(score(best), abs=1e-6)


def test_switch_penalty_removes_flicker_and_zero_is_the_argmax():
    p = torch.full((7, 2), 0.1).log()
    p[:, 0] = torch.tensor([0.9, 0.9, 0.9, 0.4, 0.9, 0.2, 0.2]).log()  # one-frame dip at t=3, real change at t=5
    p[:, 1] = (1 - p[:, 0].exp()).log()
    assert best_phone_path(p, 0.0).tolist() == p.argmax(1).tolist() == [0, 0, 0, 1, 0, 1, 1]
    assert best_phone_path(p, 1.0).tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert best_phone_path(p[:0], 1.0).tolist() == [] and best_phone_path(p[:1], 1.0).tolist() == [0]


def _synthetic(n_utts: int, seed: int):
    """Utterances of phone runs; each phone's frames ~ N(mean_phone, 0.5^2) in 6 dims."""
    g = torch.Generator().manual_seed(seed)
    means = {p: 2.0 * torch.randn(6, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(PHONES)}
    feats, labels = [], []
    for _ in range(n_utts):
        seq = [PHONES[int(torch.randint(3, (1,), generator=g))] for _ in range(6)]
        lab = [p for p in seq for _ in range(int(torch.randint(2, 5, (1,), generator=g)))]
        feats.append(torch.stack([means[p] + 0.5 * torch.randn(6, generator=g) for p in lab]))
        labels.append(lab)
    return feats, labels, means


def _bayes(feats, means):
    """The optimal classifier for equal-variance Gaussians: nearest class mean."""
    centre = torch.stack([means[p] for p in sorted(PHONES)])
    return [torch.cdist(f, centre).argmin(1) for f in feats]


@pytest.fixture(scope="module")
def fitted():
    feats, labels, means = _synthetic(150, seed=0)
    return PhoneClassifierQuantizer.fit(feats, labels, context=1, hidden=32, epochs=3, batch_size=128), means


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_fitted_classifier_agrees_with_the_bayes_classifier_on_held_out_frames(fitted):
    q, means = fitted
    feats, labels, _ = _synthetic(40, seed=1)
    assert q.phones == sorted(PHONES) and q.n_units == 3 and q.dim == 6
    pred, bayes = torch.cat([q(f) for f in feats]), torch.cat(_bayes(feats, means))
    truth = torch.tensor([sorted(PHONES).index(p) for lab in labels for p in lab])
    assert (pred == bayes).float().mean() > 0.95
    assert (pred == truth).float().mean() > 0.95


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_fit_is_deterministic_and_leaves_the_global_rng_alone():
    feats, labels, _ = _synthetic(20, seed=2)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = PhoneClassifierQuantizer.fit(feats, labels, context=1, hidden=16, epochs=1, batch_size=64, seed=5)
    assert torch.equal(torch.rand(1), before)
    b = PhoneClassifierQuantizer.fit(feats, labels, context=1, hidden=16, epochs=1, batch_size=64, seed=5)
    assert all(torch.equal(u, v) for u, v in zip(a.net.state_dict().values(), b.net.state_dict().values()))


def test_unit_extractor_round_trip_keeps_the_classifier(tmp_path, fitted):
    q, _ = fitted
    encoder = MFCCEncoder(n_mfcc=3, frame_stack=2)  # 6-d frames, as the synthetic features
    UnitExtractor(encoder, q).save(tmp_path / "ue")
    meta = json.loads((tmp_path / "ue" / "unit_extractor.json").read_text())
    assert meta["quantizer_kind"] == "phone_classifier" and meta["n_units"] == 3
    loaded = UnitExtractor.load(tmp_path / "ue")
    assert isinstance(loaded.quantizer, PhoneClassifierQuantizer) and loaded.quantizer.phones == q.phones
    feats, _, _ = _synthetic(3, seed=3)
    for f in feats:
        assert torch.equal(loaded.quantizer(f), q(f))
    assert loaded.quantizer.switch_penalty == q.switch_penalty == 0.0
    q.switch_penalty = 2.5
    try:
        q.save(tmp_path / "pc.safetensors")
        assert PhoneClassifierQuantizer.load(tmp_path / "pc.safetensors").switch_penalty == 2.5
    finally:
        q.switch_penalty = 0.0
    wave = torch.randn(16000)
    assert torch.equal(loaded(wave), UnitExtractor(encoder, q)(wave))


def test_bad_files_and_inputs_are_named(tmp_path, fitted):
    q, _ = fitted
    KMeansQuantizer(torch.randn(4, 6)).save(tmp_path / "km.safetensors")
    with pytest.raises(QuantizerFileError, match=r"km\.safetensors.*not a phone classifier"):
        PhoneClassifierQuantizer.load(tmp_path / "km.safetensors")
    with pytest.raises(QuantizerFileError, match="no such file"):
        PhoneClassifierQuantizer.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"expected features \[frames, 6\]"):
        q(torch.randn(5, 7))
    feats, labels, _ = _synthetic(2, seed=4)
    with pytest.raises(ValueError, match="utterance 1: .* feature frames but .* phone labels"):
        PhoneClassifierQuantizer.fit(feats, [labels[0], labels[1][:-1]])
    with pytest.raises(ValueError, match="switch_penalty must be >= 0"):
        PhoneClassifierQuantizer.fit(feats, labels, switch_penalty=-1.0)
    with pytest.raises(ValueError, match="at least 2 phones"):
        PhoneClassifierQuantizer.fit([feats[0]], [["aa"] * len(feats[0])])
    (tmp_path / "ue").mkdir()
    (tmp_path / "ue" / "unit_extractor.json").write_text(json.dumps({"encoder": {}, "quantizer_kind": "vq"}))
    with pytest.raises(ValueError, match="unknown quantizer_kind 'vq'"):
        UnitExtractor.load(tmp_path / "ue")


def test_recipe_validates_the_unit_model_and_keeps_old_hashes():
    with pytest.raises(ValueError, match=r"unit_model must be one of \('kmeans', 'phone_classifier'\), got 'vq'"):
        DemoCorpusRecipe(unit_model="vq")
    with pytest.raises(ValueError, match="cannot be used with unit_model=phone_classifier"):
        DemoCorpusRecipe(unit_model="phone_classifier", unit_encoder={"kind": "mfcc"}, unit_quantizer="km.npy")
    with pytest.raises(ValueError, match=r"phone_classifier: unknown settings \['layers'\]"):
        DemoCorpusRecipe(unit_model="phone_classifier", phone_classifier={"layers": 3})
    canonical = DemoCorpusRecipe().canonical()  # corpora built before these fields keep their hash
    assert "unit_model" not in canonical and "phone_classifier" not in canonical
    pc = DemoCorpusRecipe(unit_model="phone_classifier")
    assert pc.hash() != DemoCorpusRecipe().hash()
    assert pc.canonical()["phone_classifier"] == {"context": 5, "hidden": 512, "epochs": 6,
                                                      "switch_penalty": 3.0}  # defaults count
    assert DemoCorpusRecipe(unit_model="phone_classifier", phone_classifier={"hidden": 64}).hash() != pc.hash()


MICRO = dict(n_train=24, n_val=6, n_test=6, n_text=20, shard_size=12, text_vocab_size=300)


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_corpus_with_phone_classifier_units(tmp_path):
    recipe = DemoCorpusRecipe(**MICRO, unit_model="phone_classifier", n_units=64, mfcc={"cmvn": "utterance"},
                              phone_classifier={"hidden": 64})
    corpus = build_demo_corpus(recipe, tmp_path, num_workers=1, progress=False)
    extractor = UnitExtractor.load(corpus / "unit_extractor")
    assert isinstance(extractor.quantizer, PhoneClassifierQuantizer) and extractor.n_units <= 64
    m = load_manifest(corpus)
    assert 0 <= m["speech"]["validation"]["unit_pnmi"] <= 1
    frames = correct = 0
    for sample in read_shard(corpus / m["speech"]["train"]["shards"][0]["path"]):
        units = np.load(io.BytesIO(sample["units.npy"]), allow_pickle=False)
        assert units.max() < extractor.n_units
        wave, _ = read_audio(sample["flac"])
        assert len(extractor(wave)) == len(units)
        phones = frame_phones(json.loads(sample["json"])["phones"], len(units), extractor.frame_rate)
        correct += sum(extractor.quantizer.phones[u] == p for u, p in zip(units, phones))
        frames += len(units)
    assert correct / frames > 0.5  # fitted on these utterances: most frames get their own phone (chance ~0.1)
    refs, hyps = [], []  # the manifest's validation phone error rate, recomputed with a hand-written Levenshtein
    for shard in m["speech"]["validation"]["shards"]:
        for sample in read_shard(corpus / shard["path"]):
            units = np.load(io.BytesIO(sample["units.npy"]), allow_pickle=False).tolist()
            refs.append([x.rsplit(":", 1)[0] for x in json.loads(sample["json"])["phones"].split()])
            hyps.append([extractor.quantizer.phones[u] for u in units])
    merged = lambda seq: [x for i, x in enumerate(seq) if i == 0 or x != seq[i - 1]]  # noqa: E731
    errors = sum(_levenshtein(merged(r), merged(h)) for r, h in zip(refs, hyps))
    expected = errors / sum(len(merged(r)) for r in refs)
    assert m["speech"]["validation"]["unit_phone_error_rate"] == pytest.approx(expected, abs=1e-4)


def _levenshtein(a: list, b: list) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_too_few_units_for_the_phone_inventory_is_named(tmp_path):
    recipe = DemoCorpusRecipe(**MICRO, unit_model="phone_classifier", n_units=8)
    with pytest.raises(ValueError, match=r"phones but the corpus recipe has n_units=8: set data.corpus.n_units >= "):
        build_demo_corpus(recipe, tmp_path, num_workers=1, progress=False)


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_a_corpus_reuses_the_unit_extractor_of_its_front_end_corpus(tmp_path):
    front_end = dict(n_train=24, n_val=2, n_test=2, n_text=0, min_words=11, max_words=20, shard_size=12)
    recipe = DemoCorpusRecipe(**MICRO, max_words=10, unit_model="phone_classifier", n_units=64,
                              mfcc={"cmvn": "utterance"}, phone_classifier={"hidden": 64},
                              unit_extractor_from=front_end)
    source = recipe.front_end_recipe()
    # the unit settings are the consumer's; the sentence selection is the front end's
    assert (source.n_units, source.mfcc, source.phone_classifier, source.min_words) == (64, {"cmvn": "utterance"},
                                                                                       {"hidden": 64}, 11)
    corpus = build_demo_corpus(recipe, tmp_path, num_workers=1, progress=False)
    source_dir = tmp_path / "demo" / source.hash()
    assert load_manifest(source_dir)["recipe"] == source.canonical()  # built (and cached) on the way
    extractor, own = UnitExtractor.load(source_dir / "unit_extractor"), UnitExtractor.load(corpus / "unit_extractor")
    m = load_manifest(corpus)
    for sample in read_shard(corpus / m["speech"]["test"]["shards"][0]["path"]):
        wave, _ = read_audio(sample["flac"])  # this corpus's test audio, through the front end's extractor
        units = np.load(io.BytesIO(sample["units.npy"]), allow_pickle=False)
        assert np.array_equal(units, extractor(wave)) and np.array_equal(units, own(wave))
    assert recipe.hash() != DemoCorpusRecipe(**MICRO, max_words=10, unit_model="phone_classifier", n_units=64,
                                             mfcc={"cmvn": "utterance"}, phone_classifier={"hidden": 64}).hash()


def test_a_front_end_corpus_that_heard_the_held_out_sentences_is_refused(tmp_path):
    # same seed and sentence range: the front end's test sentences are this corpus's test sentences
    recipe = DemoCorpusRecipe(**MICRO, unit_model="phone_classifier", n_units=64,
                              unit_extractor_from={"n_train": 24, "n_text": 0})
    with pytest.raises(ValueError, match=r"front-end corpus speaks \d+ of this corpus's test/validation sentences"):
        build_demo_corpus(recipe, tmp_path, num_workers=1, progress=False)
    assert not (tmp_path / "demo" / recipe.front_end_recipe().hash()).exists()


def test_front_end_fields_are_checked():
    with pytest.raises(ValueError, match=r"not settable fields \['n_units'\]"):
        DemoCorpusRecipe(unit_extractor_from={"n_units": 8})
    with pytest.raises(ValueError, match=r"not settable fields \['bogus'\]"):
        DemoCorpusRecipe(unit_extractor_from={"bogus": 1})
    with pytest.raises(ValueError, match="unit_extractor_from and unit_quantizer both give the units"):
        DemoCorpusRecipe(unit_encoder={"kind": "mfcc"}, unit_quantizer="km.npy", unit_extractor_from={"seed": 1})
    assert "unit_extractor_from" not in DemoCorpusRecipe().canonical()  # older corpora keep their hash
