"""Train a UnitMelVocoder for a corpus: its sentences spoken by ONE flite voice at its default pitch and speed,
unit-coded by the corpus's own unit extractor, then the mel decoder fitted on (waveform, units) pairs.

One voice with a fixed prosody keeps the harmonics the decoder learns consistent (the corpus itself mixes four
voices with varied pitch and speed, whose average mel is a buzz). The units are voice-independent (a phone
classifier), so units from any voice, or from the model, are voiced in this one.

    python -m most_lightning.eval.unit_mel_training data/demo/<hash> out/vocoder [--sentences N --steps N]

Settings (voice, sentences, steps, decoder width and depth) have one home, the TTS task's unit_mel vocoder in
conf/eval/tasks/tts.yaml: the eval suite and these command lines read them from there.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import itertools
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from most_lightning.audio.unit_mel_vocoder import CONFIG_FILE, UnitMelConfig, UnitMelVocoder, fit_unit_mel_vocoder

log = logging.getLogger(__name__)


def speak(sentences: Sequence[str], voice: str, directory: Path) -> list[torch.Tensor]:
    """16 kHz waveforms of the sentences by flite's `voice` (default prosody)."""
    from most_lightning.data.flite import Utterance, check_voices, synthesize

    from most_lightning.audio.io import read_audio

    check_voices([voice])
    waves = []
    for i, text in enumerate(sentences):
        path = directory / f"{i}.wav"
        synthesize(Utterance(str(i), text, text, voice), str(path))
        wave, _ = read_audio(path.read_bytes(), name=path.name)
        waves.append(wave)
    return waves


def train_unit_mel_vocoder(extractor, sentences: Sequence[str], *, voice: str, steps: int, channels: int, layers: int,
                           batch_size: int = 16, seed: int = 0, n_units: int | None = None,
                           **config_overrides) -> UnitMelVocoder:
    """extractor: the corpus's UnitExtractor (waveform -> NON-deduplicated unit ids at its frame rate).
    n_units: the model's unit vocabulary (the corpus's `n_units`, which may reserve more ids than the extractor
    produces, e.g. 64 for a phone classifier of 41 classes); default the extractor's."""
    if not sentences:
        raise ValueError("train_unit_mel_vocoder needs at least one sentence")
    n_units = extractor.n_units if n_units is None else n_units
    if n_units < extractor.n_units:
        raise ValueError(f"n_units={n_units} is fewer than the {extractor.n_units} units the extractor produces")
    unit_hop = round(extractor.sample_rate / extractor.frame_rate)
    config = UnitMelConfig(n_units=n_units, channels=channels, layers=layers, sample_rate=extractor.sample_rate,
                           unit_hop=unit_hop, **config_overrides)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        waves = speak(sentences, voice, Path(tmp))
    pairs = [(w, extractor(w).tolist()) for w in waves]
    log.info(f"unit_mel vocoder: {len(pairs)} utterances of voice {voice} in {time.perf_counter() - start:.0f} s")

    def report(step: int, loss: float) -> None:
        if step % 50 == 0 or step == steps - 1:
            log.info(f"unit_mel vocoder: step {step}/{steps}, L1 {loss:.3f}, {time.perf_counter() - start:.0f} s")

    return fit_unit_mel_vocoder(pairs, config, steps=steps, batch_size=batch_size, seed=seed, on_step=report)


# settings of a `unit_mel` vocoder spec that trains one (conf/eval/tasks/tts.yaml writes them all); together they
# are the cache key
UNIT_MEL_SETTINGS = ("voice", "fit_utterances", "steps", "channels", "layers")
TTS_TASK_YAML = Path(__file__).resolve().parents[2] / "conf" / "eval" / "tasks" / "tts.yaml"


def unit_mel_defaults() -> dict[str, Any]:
    """The unit_mel vocoder settings of conf/eval/tasks/tts.yaml: the command lines' defaults."""
    from omegaconf import OmegaConf

    spec = OmegaConf.load(TTS_TASK_YAML).vocoders.unit_mel
    return {key: spec[key] for key in UNIT_MEL_SETTINGS}


def cached_unit_mel_vocoder(ctx, spec: Mapping[str, Any]) -> UnitMelVocoder:
    """The unit_mel vocoder of the eval context's corpus and these settings: loaded from
    <corpus>/vocoders/unit_mel-<settings hash>/ when an earlier run trained it, else trained on the corpus's train
    sentences (spoken by flite's `voice`) and saved there. Concurrent runs wait for the first to finish."""
    unknown = sorted(set(spec) - set(UNIT_MEL_SETTINGS) - {"kind", "path"})
    if unknown:
        raise ValueError(f"unit_mel vocoder: unknown setting(s) {unknown}; known: {sorted(UNIT_MEL_SETTINGS)} and path")
    missing = sorted(set(UNIT_MEL_SETTINGS) - set(spec))
    if missing:
        raise ValueError(f"unit_mel vocoder: missing setting(s) {missing} (conf/eval/tasks/tts.yaml's unit_mel "
                         "vocoder lists them all), or give path=<a saved vocoder>")
    settings = {key: spec[key] for key in UNIT_MEL_SETTINGS} | {"n_units": ctx.tokenizer.n_units}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    directory = Path(ctx.datamodule.corpus_dir) / "vocoders" / f"unit_mel-{digest}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / CONFIG_FILE).is_file():
            log.info(f"unit_mel vocoder {settings}: training it once for this corpus, into {directory}")
            sentences = shard_sentences(ctx.datamodule.shards("train"), int(settings["fit_utterances"]))
            vocoder = train_unit_mel_vocoder(ctx.unit_extractor(), sentences,
                                             voice=settings["voice"], steps=int(settings["steps"]),
                                             channels=int(settings["channels"]), layers=int(settings["layers"]),
                                             n_units=settings["n_units"])
            partial = directory.with_name(directory.name + ".partial")  # a killed run leaves no half-written cache
            shutil.rmtree(partial, ignore_errors=True)
            vocoder.save(partial)
            (partial / "settings.json").write_text(json.dumps(settings, indent=2))
            partial.rename(directory)
    log.info(f"unit_mel vocoder: {directory}")
    return UnitMelVocoder.load(directory)


def shard_sentences(shards: Sequence[str], limit: int) -> list[str]:
    """The first `limit` transcripts of speech shards (the text only: flite speaks them again in one voice);
    unreadable samples are skipped and counted in the log."""
    from most_lightning.data.samples import BadSamplePolicy, iter_shard

    policy = BadSamplePolicy("skip")
    texts = (sample.get("txt") for shard in shards for sample in iter_shard(str(shard), policy))
    sentences = [t.decode() if isinstance(t, bytes) else str(t) for t in itertools.islice(filter(None, texts), limit)]
    if policy.total:
        log.warning(f"unit_mel vocoder sentences: {policy.total} unreadable sample(s) skipped")
    return sentences


def corpus_sentences(corpus_dir: Path, split: str, limit: int) -> list[str]:
    """shard_sentences over a demo corpus's split, its shards as its manifest lists them."""
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    return shard_sentences([str(corpus_dir / s["path"]) for s in manifest["speech"][split]["shards"]], limit)


def add_unit_mel_arguments(parser: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    """The vocoder's training settings as options, defaulting to `defaults` (unit_mel_defaults())."""
    for flag, key, kind, text in (("--sentences", "fit_utterances", int, "train sentences to speak"),
                                  ("--voice", "voice", str, "the flite voice the vocoder learns"),
                                  ("--steps", "steps", int, "training steps"),
                                  ("--channels", "channels", int, "decoder width"),
                                  ("--layers", "layers", int, "decoder conv layers")):
        parser.add_argument(flag, type=kind, default=defaults[key], help=f"{text} (default: %(default)s)")


def main() -> None:
    from most_lightning.audio.units import UnitExtractor

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", type=Path, help="a demo corpus directory (data/demo/<hash>)")
    p.add_argument("out", type=Path, help="where to save the vocoder")
    add_unit_mel_arguments(p, unit_mel_defaults())
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = json.loads((args.corpus / "manifest.json").read_text())
    extractor = UnitExtractor.load(args.corpus / manifest.get("unit_extractor", "unit_extractor"))
    sentences = corpus_sentences(args.corpus, "train", args.sentences)
    vocoder = train_unit_mel_vocoder(extractor, sentences, voice=args.voice, steps=args.steps,
                                     channels=args.channels, layers=args.layers,
                                     n_units=manifest.get("n_units"))  # the corpus's unit tokens
    vocoder.save(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
