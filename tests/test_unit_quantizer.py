"""k-means quantizer files as HuBERT k-means models ship (.npy, .pt tensor, SpiritLM-style dict) against
scikit-learn's own predict; joblib pickles refused; dimension mismatches named; HuBERT unit extractor round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from most_lightning.audio import KMeansQuantizer, UnitExtractor
from most_lightning.audio.hubert import HubertEncoder
from most_lightning.audio.quantizer import QuantizerFileError


@pytest.fixture(scope="module")
def fitted():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 24)).astype(np.float32)
    km = KMeans(n_clusters=12, n_init=2, random_state=0).fit(x)
    return km, x


def test_centroid_files_in_every_format_assign_like_sklearn(tmp_path, fitted):
    km, x = fitted
    centers = km.cluster_centers_.astype(np.float32)
    np.save(tmp_path / "km.centroids.npy", centers)
    torch.save(torch.from_numpy(centers), tmp_path / "km_tensor.pt")
    torch.save({"cluster_centers": centers, "n_clusters": 12}, tmp_path / "km_spiritlm.pt")  # numpy inside
    save_file({"centroids": torch.from_numpy(centers)}, str(tmp_path / "km.safetensors"))
    expected = km.predict(x)
    for name in ("km.centroids.npy", "km_tensor.pt", "km_spiritlm.pt", "km.safetensors"):
        q = KMeansQuantizer.load(tmp_path / name, expected_dim=24)
        assert q.n_units == 12 and q.source.endswith(name)
        assert np.array_equal(q(torch.from_numpy(x)).numpy(), expected), name


def test_joblib_kmeans_is_refused_with_a_conversion_hint(tmp_path, fitted):
    import joblib

    km, _ = fitted
    for name in ("km500.bin", "km.joblib"):
        joblib.dump(km, tmp_path / name)
        with pytest.raises(QuantizerFileError, match=rf"{name}.*not loaded here.*numpy\.save\('centroids\.npy'"):
            KMeansQuantizer.load(tmp_path / name)


def test_quantizer_file_errors_name_file_and_key(tmp_path):
    torch.save({"cluster_centers": np.zeros((5, 8), np.float32), "n_clusters": 6}, tmp_path / "bad_count.pt")
    with pytest.raises(QuantizerFileError, match=r"bad_count\.pt.*n_clusters=6.*'cluster_centers' has 5 rows"):
        KMeansQuantizer.load(tmp_path / "bad_count.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "no_key.pt")
    with pytest.raises(QuantizerFileError, match=r"no_key\.pt.*no centroid key.*'weights'"):
        KMeansQuantizer.load(tmp_path / "no_key.pt")
    np.save(tmp_path / "c768.npy", np.zeros((4, 768), np.float32))
    with pytest.raises(QuantizerFileError, match=r"c768\.npy.*768-d but HuBERT layer 11 gives 64-d"):
        KMeansQuantizer.load(tmp_path / "c768.npy", expected_dim=64, feature_source="HuBERT layer 11")


def test_extractor_refuses_a_quantizer_of_another_layer_naming_both(tmp_path):
    np.save(tmp_path / "c768.npy", np.zeros((4, 768), np.float32))
    enc = HubertEncoder.random("tiny", layer=11)
    with pytest.raises(ValueError, match=r"hubert encoder layer 11 gives 64-d.*c768\.npy\) has 768-d"):
        UnitExtractor(enc, KMeansQuantizer.load(tmp_path / "c768.npy"))


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_hubert_unit_extractor_fit_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    waves = [0.1 * torch.randn(n) for n in (16000, 12000, 9000)]
    enc = HubertEncoder.random("tiny", layer=11, seed=3)
    extractor = UnitExtractor.fit(waves, n_units=8, encoder=enc, dedup=True)
    extractor.save(tmp_path / "ex")
    loaded = UnitExtractor.load(tmp_path / "ex")
    assert loaded.frame_rate == 25.0 and loaded.encoder.layer == 11
    for w in waves:
        units = loaded(w)
        assert torch.equal(units, extractor(w))
        # nearest centroid by brute force on the encoder's features (independent of the quantizer's algebra)
        feats = enc(w)
        raw = torch.cdist((feats - extractor.quantizer.mean) / extractor.quantizer.std,
                          extractor.quantizer.centroids).argmin(1).tolist()
        assert units.tolist() == [u for i, u in enumerate(raw) if i == 0 or u != raw[i - 1]]


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_extract_units_cli_over_audio_files(tmp_path, capsys):
    """The batch job: every decodable file's units equal the extractor's own, at its frame rate; a broken file
    is skipped and named (or stops the job with --on-bad-file raise)."""
    import json

    import soundfile as sf

    from most_lightning.audio.extract_units import main

    torch.manual_seed(0)
    waves = [0.1 * torch.randn(n) for n in (16000, 12000, 9000)]
    extractor = UnitExtractor.fit(waves, n_units=8, encoder=HubertEncoder.random("tiny", layer=11, seed=3))
    extractor.save(tmp_path / "ex")
    (tmp_path / "wavs" / "sub").mkdir(parents=True)
    for i, w in enumerate(waves):
        sf.write(tmp_path / "wavs" / ("sub" if i == 2 else "") / f"u{i}.wav", w.numpy(), 16000, subtype="FLOAT")
    (tmp_path / "wavs" / "broken.wav").write_bytes(b"RIFF not really")
    out = tmp_path / "units.jsonl"
    assert main(["--extractor", str(tmp_path / "ex"), str(tmp_path / "wavs"), "-o", str(out), "--dedup",
                 "--batch-size", "2", "--no-progress"]) == 0
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(records) == ["u0.wav", "u1.wav", "u2.wav"]
    extractor.dedup = True
    for i, w in enumerate(waves):
        r = records[f"u{i}.wav"]
        assert r["units"] == extractor(w).tolist() and r["frame_rate"] == 25.0 and r["deduplicated"]
        assert r["n_frames"] == extractor.encoder.n_frames(w.numel())
    assert "broken.wav" in capsys.readouterr().err
    from most_lightning.audio import AudioDecodeError

    with pytest.raises(AudioDecodeError, match="broken.wav"):
        main(["--extractor", str(tmp_path / "ex"), str(tmp_path / "wavs"), "-o", str(out), "--on-bad-file", "raise",
              "--no-progress"])


def test_extract_units_cli_from_a_hubert_checkpoint_checks_the_quantizer_dim(tmp_path):
    import json

    import soundfile as sf

    from most_lightning.audio.extract_units import main
    from most_lightning.audio.hubert_checkpoints import save_torchaudio_checkpoint

    enc = HubertEncoder.random("tiny", seed=5)
    save_torchaudio_checkpoint(enc.model, enc.arch, tmp_path / "hubert.safetensors")
    np.save(tmp_path / "c768.npy", np.zeros((4, 768), np.float32))
    wave = 0.1 * torch.randn(8000)
    sf.write(tmp_path / "a.wav", wave.numpy(), 16000, subtype="FLOAT")
    with pytest.raises(QuantizerFileError, match=r"c768\.npy.*768-d but HuBERT .*hubert\.safetensors layer 11 gives 64-d"):
        main(["--hubert", str(tmp_path / "hubert.safetensors"), "--quantizer", str(tmp_path / "c768.npy"),
              str(tmp_path / "a.wav"), "--no-progress"])
    centroids = torch.randn(6, 64)
    np.save(tmp_path / "c64.npy", centroids.numpy())
    out = tmp_path / "u.jsonl"
    assert main(["--hubert", str(tmp_path / "hubert.safetensors"), "--quantizer", str(tmp_path / "c64.npy"),
                 str(tmp_path / "a.wav"), "-o", str(out), "--no-progress"]) == 0
    expected = torch.cdist(HubertEncoder.from_checkpoint(str(tmp_path / "hubert.safetensors"), layer=11)(wave),
                           centroids).argmin(1).tolist()
    assert json.loads(out.read_text())["units"] == expected
