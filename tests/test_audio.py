"""Audio front end: waveform I/O, MFCC encoder, k-means quantizer, unit extractor (fit/save/load, dedup)."""

import io
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from most_lightning.audio import (AudioDecodeError, KMeansQuantizer, MFCCConfig, MFCCEncoder, UnitExtractor,
                                  audio_info, dedup_units, encode_audio, read_audio)


def tone(freq: float, seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt)
    return buf.getvalue()


def test_read_audio_mixes_stereo_to_mono_and_resamples(tmp_path):
    left, right = tone(220, 0.5, 8000), tone(330, 0.5, 8000)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 8000)
    wave, rate = read_audio(path)
    assert rate == 16000 and wave.dtype == torch.float32 and wave.dim() == 1
    assert abs(wave.numel() - 16000 * 0.5) <= 2  # 8 kHz -> 16 kHz doubles the length
    first, _ = read_audio(path, target_sample_rate=None, mono="first")
    mean, _ = read_audio(path, target_sample_rate=None, mono="mean")
    assert torch.allclose(first, torch.from_numpy(left), atol=1e-4)
    assert torch.allclose(mean, torch.from_numpy((left + right) / 2), atol=1e-4)
    with pytest.raises(AudioDecodeError, match="2 channels"):
        read_audio(path, mono="error")


def test_read_audio_accepts_bytes_and_formats_soundfile_reads():
    samples = tone(440, 0.25)
    for fmt in ("WAV", "FLAC", "OGG"):
        wave, rate = read_audio(wav_bytes(samples, 16000, fmt))
        assert rate == 16000 and abs(wave.numel() - samples.size) <= 64


def test_undecodable_audio_names_the_source(tmp_path):
    with pytest.raises(AudioDecodeError, match="utt_42"):
        read_audio(b"definitely not audio", name="utt_42")
    bad = tmp_path / "broken.flac"
    bad.write_bytes(b"fLaC" + bytes(100))
    with pytest.raises(AudioDecodeError, match="broken.flac"):
        read_audio(bad)
    with pytest.raises(AudioDecodeError, match="utt_7"):
        audio_info(b"garbage", name="utt_7")
    with pytest.raises(AudioDecodeError, match="no audio samples"):
        read_audio(wav_bytes(np.zeros(0, np.float32), 16000), name="empty")


def test_flac_round_trip_is_16_bit_exact_enough():
    samples = torch.from_numpy(tone(300, 0.2))
    back, rate = read_audio(encode_audio(samples, 16000))
    assert rate == 16000 and torch.allclose(back, samples, atol=1 / 32768 + 1e-6)


@pytest.mark.parametrize("stack", [1, 4])
def test_mfcc_encoder_runs_at_25_hz(stack):
    enc = MFCCEncoder(MFCCConfig(frame_stack=stack, deltas=2 if stack == 1 else 0))
    feats = enc(torch.from_numpy(tone(200, 2.0)))
    assert enc.frame_rate == 25.0
    assert feats.shape == (enc.n_frames(32000), enc.dim)
    assert abs(feats.shape[0] - 50) <= 1
    with pytest.raises(ValueError, match="mono"):
        enc(torch.zeros(2, 100))


def test_mfcc_config_validates():
    with pytest.raises(ValueError, match="multiple of frame_stack"):
        MFCCConfig(hop_length=640, frame_stack=3)
    with pytest.raises(ValueError, match="deltas"):
        MFCCConfig(deltas=3)


def test_dedup_merges_consecutive_repeats_only():
    assert dedup_units([5, 5, 7, 7, 7, 5, 1, 1]) == [5, 7, 5, 1]
    assert dedup_units(torch.tensor([3])) == [3]
    assert dedup_units([]) == []


def test_kmeans_quantizer_assigns_nearest_centroid_and_round_trips(tmp_path):
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    q = KMeansQuantizer(centroids)
    assert q(torch.tensor([[9.0, 1.0], [1.0, 1.0], [0.0, 8.0]])).tolist() == [1, 0, 2]
    rng = np.random.default_rng(0)
    data = np.concatenate([rng.normal(c, 0.1, size=(200, 2)) for c in centroids.numpy()])
    fitted = KMeansQuantizer.fit(data, n_units=3, seed=0)
    labels = fitted(torch.from_numpy(data).float())
    assert len(set(labels[:200].tolist())) == 1 and len(set(labels.tolist())) == 3
    fitted.save(tmp_path / "km.safetensors")
    loaded = KMeansQuantizer.load(tmp_path / "km.safetensors")
    assert torch.equal(loaded.centroids, fitted.centroids) and torch.equal(loaded(torch.from_numpy(data).float()), labels)
    with pytest.raises(ValueError, match="at least n_units"):
        KMeansQuantizer.fit(data[:2], n_units=3)


def test_unit_extractor_fit_save_load_gives_identical_units(tmp_path):
    rng = np.random.default_rng(1)
    waves = [torch.from_numpy(tone(f, 1.0) + 0.01 * rng.standard_normal(16000).astype(np.float32))
             for f in (150, 300, 600, 1200)]
    ext = UnitExtractor.fit(waves, n_units=8, seed=0)
    assert ext.n_units == 8 and ext.frame_rate == 25.0 and ext.sample_rate == 16000
    units = ext(waves[0])
    assert units.dtype == torch.long and units.min() >= 0 and units.max() < 8
    assert abs(units.numel() - 25) <= 1  # one unit per 40 ms, before dedup
    ext.save(tmp_path / "ext")
    loaded = UnitExtractor.load(tmp_path / "ext")
    for w in waves:
        assert torch.equal(loaded(w), ext(w))
    deduped = UnitExtractor(loaded.encoder, loaded.quantizer, dedup=True)
    assert deduped(waves[1]).tolist() == dedup_units(ext(waves[1]))
    with pytest.raises(FileNotFoundError, match="UnitExtractor.save"):
        UnitExtractor.load(tmp_path / "nothing_here")


def test_unit_extractor_takes_any_feature_encoder():
    """The seam HuBERT will use: any object with sample_rate/frame_rate/dim/__call__/config."""

    class FrameEnergy:
        sample_rate, frame_rate, dim = 16000, 25.0, 1

        def __call__(self, wave):
            return wave[: wave.numel() // 640 * 640].reshape(-1, 640).pow(2).mean(1, keepdim=True)

        def config(self):
            return {"kind": "energy"}

    q = KMeansQuantizer(torch.tensor([[0.0], [1.0]]))
    units = UnitExtractor(FrameEnergy(), q)(torch.cat([torch.zeros(640), torch.ones(640)]))
    assert units.tolist() == [0, 1]
    with pytest.raises(ValueError, match="1-d features"):
        UnitExtractor(FrameEnergy(), KMeansQuantizer(torch.zeros(2, 3)))


def test_pnmi_scores_units_against_phone_alignments():
    from most_lightning.audio.quality import frame_phones, pnmi, utterance_pnmi

    assert frame_phones("pau:0.05 a:0.13 b:0.2", 5, 25.0) == ["pau", "a", "a", "b", "b"]
    phones = ["a", "b", "c", "a"] * 50
    assert pnmi(phones, [{"a": 0, "b": 1, "c": 2}[p] for p in phones]) == pytest.approx((1.0, 1.0))
    assert pnmi(phones, [7] * len(phones))[0] == pytest.approx(0.0)
    score, purity = utterance_pnmi(["a:0.04 b:0.08"], [[3, 4]])
    assert score == pytest.approx(1.0) and purity == 1.0


def test_phone_error_rate_merges_repeats_and_counts_edits_by_hand():
    from most_lightning.audio.quality import phone_error_rate

    # ref pau a b pau (4 phones); hyp frames pau pau a c c pau -> pau a c pau: one substitution
    assert phone_error_rate(["pau:0.1 a:0.2 b:0.3 pau:0.4"], [["pau", "pau", "a", "c", "c", "pau"]]) == 0.25
    # a second utterance: ref x y (2), hyp x (one deletion) -> 2 errors over 6 reference phones
    assert phone_error_rate(["pau:0.1 a:0.2 b:0.3 pau:0.4", "x:0.1 y:0.2"],
                            [["pau", "a", "c", "pau"], ["x", "x"]]) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="no reference phones"):
        phone_error_rate([], [])
