"""The CPU unit-to-speech path: run lengths and duration expansion (against hand-computed values), the decoder's
shapes, the duration table, save/load, and a decoder trained on a tiny set that reproduces its mel frames."""

from __future__ import annotations

import math

import pytest
import torch

from most_lightning.audio.mean_mel_vocoder import UnitVocabularyMismatchError
from most_lightning.audio.unit_mel_vocoder import (
    DurationTable,
    UnitMelConfig,
    UnitMelDecoder,
    UnitMelVocoder,
    expand_units,
    fit_unit_mel_vocoder,
    mel_target,
    run_lengths,
)


def test_run_lengths_by_hand():
    assert run_lengths([5, 5, 7, 5, 5, 5]) == ([5, 7, 5], [2, 1, 3])
    assert run_lengths(torch.tensor([1])) == ([1], [1])
    assert run_lengths([]) == ([], [])


def test_expand_units_against_a_hand_computed_example():
    frames, feats = expand_units(torch.tensor([3, 1]), torch.tensor([2, 3]))
    assert frames.tolist() == [3, 3, 1, 1, 1]
    # position within the run: (index + 0.5) / run length; second column log(run length)
    assert feats[:, 0].tolist() == pytest.approx([0.25, 0.75, 1 / 6, 0.5, 5 / 6])
    assert feats[:, 1].tolist() == pytest.approx([math.log(2)] * 2 + [math.log(3)] * 3)
    with pytest.raises(ValueError, match=">= 1 frame"):
        expand_units(torch.tensor([3, 1]), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        expand_units(torch.tensor([3, 1]), torch.tensor([2]))


def test_duration_table_is_the_mean_run_length():
    # unit 0: runs of 2 and 4 (mean 3); unit 1: one run of 1; unit 2 never seen -> global mean (2+4+1)/3
    table = DurationTable.fit([[0, 0, 1, 0, 0, 0, 0]], n_units=3)
    assert table.mean_frames.tolist() == pytest.approx([3.0, 1.0, 7 / 3], rel=1e-6)
    assert table(torch.tensor([0, 1, 2])).tolist() == [3, 1, 2]


def test_config_rejects_a_unit_hop_that_is_not_a_multiple_of_the_mel_hop():
    with pytest.raises(ValueError, match="unit_hop \\(300\\) must be a positive multiple of mel_hop \\(160\\)"):
        UnitMelConfig(n_units=4, channels=8, layers=1, unit_hop=300)


def test_decoder_and_vocoder_shapes(tmp_path):
    config = UnitMelConfig(n_units=4, unit_hop=320, channels=16, layers=2, griffin_lim_iters=2)
    decoder = UnitMelDecoder(config)
    frames, feats = expand_units(torch.tensor([0, 3, 1]), torch.tensor([2, 1, 4]))
    assert decoder(frames[None], feats[None]).shape == (1, 7 * 2, 80)  # 2 mel frames per 50 Hz unit frame
    vocoder = UnitMelVocoder(config, decoder, DurationTable(torch.tensor([1.0, 2.0, 3.0, 4.0])))
    # deduplicated=False: [0,0,3,1,1,1,1] keeps its runs -> 7 unit frames -> 14 mel frames
    assert vocoder.log_mel([0, 0, 3, 1, 1, 1, 1], deduplicated=False).shape == (14, 80)
    # deduplicated: durations from the table (1 + 4 + 2 unit frames)
    assert vocoder.log_mel([0, 3, 1], deduplicated=True).shape == (14, 80)
    wave = vocoder([0, 3, 1])
    assert wave.shape[0] == pytest.approx(7 * 320, abs=160) and wave.abs().max() <= 0.9 + 1e-6
    assert torch.equal(vocoder([0, 3, 1]), wave)  # Griffin-Lim's random start does not leak in
    vocoder.save(tmp_path / "v")
    again = UnitMelVocoder.load(tmp_path / "v")
    assert again.config == config
    assert torch.equal(again.log_mel([0, 3, 1]), vocoder.log_mel([0, 3, 1]))
    with pytest.raises(UnitVocabularyMismatchError, match="knows 4 units"):
        vocoder([0, 4])
    with pytest.raises(FileNotFoundError, match="no unit_mel_vocoder.json"):
        UnitMelVocoder.load(tmp_path / "missing")


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_trained_on_a_tiny_set_it_reproduces_the_mel_frames():
    """Two 'phones' (a low and a high tone) and silence: after training, the decoder's log-mel for the true units
    is far closer to the target than the target's own mean (an untrained or unit-blind decoder's best)."""
    torch.manual_seed(0)
    sr, hop = 16_000, 320
    t = torch.arange(hop) / sr

    def tone(f, n):
        return torch.cat([torch.sin(2 * math.pi * f * t)] * n) * 0.5

    pairs = []
    for a, b, c in [(3, 5, 2), (6, 2, 4), (2, 7, 3), (5, 3, 5)]:
        wave = torch.cat([torch.zeros(hop * 2), tone(300, a), tone(1500, b), tone(300, c), torch.zeros(hop * 2)])
        units = [0] * 2 + [1] * a + [2] * b + [1] * c + [0] * 2
        pairs.append((wave, units))
    config = UnitMelConfig(n_units=3, unit_hop=hop, channels=32, layers=2)
    vocoder = fit_unit_mel_vocoder(pairs, config, steps=250, batch_size=4, lr=3e-3)
    errors, baselines = [], []
    for wave, units in pairs:
        target = mel_target(wave, config)[: len(units) * 2]
        pred = vocoder.log_mel(units, deduplicated=False)
        errors.append((pred - target).abs().mean())
        baselines.append((target - target.mean(0)).abs().mean())
    assert sum(errors) / len(errors) < 0.3 * sum(baselines) / len(baselines)
    # the duration table learned the mean run lengths of the training units: unit 2 ran 5, 2, 7, 3 frames
    assert float(vocoder.durations.mean_frames[2]) == pytest.approx(4.25)


@pytest.mark.skipif(__import__("shutil").which("flite") is None, reason="needs the flite program (setup.sh)")
def test_a_vocoder_trained_for_a_corpus_covers_the_models_unit_vocabulary():
    """A phone classifier produces fewer classes (e.g. 41) than the corpus reserves unit tokens for (64): the
    vocoder must take every unit id the model can emit, or the TTS eval refuses it."""
    from most_lightning.eval.unit_mel_training import train_unit_mel_vocoder

    class ThreeClassExtractor:  # waveform -> one of 3 "phones" per 20 ms frame, by energy
        sample_rate, frame_rate, n_units = 16_000, 50, 3

        def __call__(self, wave):
            frames = wave[: len(wave) // 320 * 320].view(-1, 320).abs().mean(1)
            return torch.bucketize(frames, torch.tensor([0.01, 0.1]))

    small = dict(voice="slt", steps=2, channels=8, layers=1, batch_size=1)
    vocoder = train_unit_mel_vocoder(ThreeClassExtractor(), ["a cat"], n_units=5, **small)
    assert vocoder.n_units == 5 and vocoder([4, 0, 2]).numel() > 0  # an id the extractor never gave is voiced
    assert train_unit_mel_vocoder(ThreeClassExtractor(), ["a cat"], **small).n_units == 3
    with pytest.raises(ValueError, match="n_units=2 is fewer than the 3 units the extractor produces"):
        train_unit_mel_vocoder(ThreeClassExtractor(), ["a cat"], n_units=2, **small)
