"""Can the CPU unit vocoder voice a corpus's units? Train a UnitMelVocoder (flite voice, the corpus's unit
extractor), then resynthesise the TRUE units (with their run lengths) of held-out test utterances and transcribe
them with pocketsphinx, next to the original audio (the judge's ceiling) and, with --dedup, the same units
deduplicated with the vocoder's duration table (what a TTS model's output gets).

    python experiments/unit_mel_vocoder_check.py data/demo/<hash> --test 20   # conf/eval/tasks/tts.yaml's settings
    python experiments/unit_mel_vocoder_check.py data/demo/<hash> --vocoder out/vocoder --test 20   # reuse one

Prints a JSON line with WERs and wall times, and writes a few FLACs to --audio-out.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch


def main() -> None:
    from most_lightning.audio.io import encode_audio, read_audio
    from most_lightning.audio.unit_mel_vocoder import UnitMelVocoder
    from most_lightning.audio.units import UnitExtractor, dedup_units
    from most_lightning.data.samples import AUDIO_MEMBER, BadSamplePolicy, decode_speech_sample, iter_shard
    from most_lightning.eval.recognizers import build_recognizer
    from most_lightning.eval.unit_mel_training import (add_unit_mel_arguments, corpus_sentences,
                                                       train_unit_mel_vocoder, unit_mel_defaults)
    from most_lightning.metrics.transcripts import TranscriptErrorRates

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", type=Path)
    p.add_argument("--vocoder", type=Path, default=None, help="a saved vocoder (else train one)")
    p.add_argument("--save", type=Path, default=None, help="save the trained vocoder here")
    add_unit_mel_arguments(p, unit_mel_defaults())
    p.add_argument("--test", type=int, default=20)
    p.add_argument("--dedup", action="store_true", help="also: deduplicated units + the duration table")
    p.add_argument("--audio-out", type=Path, default=Path("/tmp/unit_mel_check"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    manifest = json.loads((args.corpus / "manifest.json").read_text())
    extractor = UnitExtractor.load(args.corpus / manifest.get("unit_extractor", "unit_extractor"))
    result: dict = {"corpus": str(args.corpus), "voice": args.voice}
    start = time.perf_counter()
    if args.vocoder:
        vocoder = UnitMelVocoder.load(args.vocoder)
    else:
        vocoder = train_unit_mel_vocoder(extractor, corpus_sentences(args.corpus, "train", args.sentences),
                                         voice=args.voice, steps=args.steps, channels=args.channels,
                                         layers=args.layers)
        result |= {"train_sentences": args.sentences, "steps": args.steps, "channels": args.channels,
                   "layers": args.layers}
        if args.save:
            vocoder.save(args.save)
    result["vocoder_seconds"] = round(time.perf_counter() - start, 1)
    utts = []
    for shard in sorted((args.corpus / "speech").glob("test-*.tar")):
        for sample in iter_shard(str(shard), BadSamplePolicy("raise")):
            rec = decode_speech_sample(sample, extractor.n_units, dedup=False)
            wave, _ = read_audio(sample[AUDIO_MEMBER], name=rec.key)
            utts.append((rec.key, rec.transcript, wave, rec.units))
            if len(utts) >= args.test:
                break
        if len(utts) >= args.test:
            break
    refs = [u[1] for u in utts]
    recognizer = build_recognizer({"kind": "pocketsphinx"})
    args.audio_out.mkdir(parents=True, exist_ok=True)

    def score(name: str, waves: list[torch.Tensor]) -> None:
        t = time.perf_counter()
        hyps = recognizer.transcribe(waves)
        s = TranscriptErrorRates()
        s.update(hyps, refs)
        out = s.compute()
        result[f"wer_{name}"], result[f"cer_{name}"] = round(float(out["wer"]), 4), round(float(out["cer"]), 4)
        result[f"examples_{name}"] = [{"reference": r, "hypothesis": h} for r, h in zip(refs[:3], hyps[:3])]
        result[f"seconds_{name}"] = round(time.perf_counter() - t, 1)
        for (key, *_), w in list(zip(utts, waves))[:2]:
            (args.audio_out / f"{key}.{name}.flac").write_bytes(encode_audio(w, 16_000))

    score("original", [u[2] for u in utts])
    score("resynth_true_durations", [vocoder(u[3], deduplicated=False) for u in utts])
    if args.dedup:
        score("resynth_duration_table", [vocoder(dedup_units(u[3]), deduplicated=True) for u in utts])
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
