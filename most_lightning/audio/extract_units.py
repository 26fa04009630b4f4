"""Batch unit extraction: audio files -> unit ids at the encoder's frame rate, as JSON lines.

    python -m most_lightning.audio.extract_units --extractor data/demo/<hash>/unit_extractor wavs/ -o units.jsonl
    python -m most_lightning.audio.extract_units --hubert mhubert_base_25hz.pt --layer 11 \\
        --quantizer L11_km500.centroids.npy --dedup --device cuda corpus/ -o units.jsonl

Any `UnitExtractor` works (the MFCC one of the demo corpus, or HuBERT + k-means). Inputs are files, folders
(searched recursively for audio extensions) or @list files (one path per line). Each output line:
{"path", "units", "n_frames", "seconds", "frame_rate", "deduplicated"}. Files soundfile cannot decode are
skipped and listed at the end (or stop the job with --on-bad-file raise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .io import AudioDecodeError, read_audio
from .units import UnitExtractor, dedup_units

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")


def find_audio(inputs: Iterable[str], extensions: tuple[str, ...] = AUDIO_EXTENSIONS) -> list[Path]:
    """Files, folders (recursive) and @list files -> audio paths, in a stable order."""
    out: list[Path] = []
    for item in inputs:
        if item.startswith("@"):
            out += [Path(line.strip()) for line in Path(item[1:]).read_text().splitlines() if line.strip()]
        elif Path(item).is_dir():
            out += sorted(p for p in Path(item).rglob("*") if p.suffix.lower() in extensions and p.is_file())
        else:
            out.append(Path(item))
    return out


def build_extractor(args: argparse.Namespace) -> UnitExtractor:
    if args.extractor:
        extractor = UnitExtractor.load(args.extractor)
    else:
        from .hubert import HubertEncoder
        from .quantizer import KMeansQuantizer

        layer = int(args.layer) if str(args.layer).isdigit() else args.layer
        encoder = HubertEncoder.from_checkpoint(args.hubert, layer=layer, format=args.format)
        quantizer = KMeansQuantizer.load(args.quantizer, expected_dim=encoder.dim,
                                         feature_source=f"HuBERT {args.hubert} layer {encoder.layer}")
        extractor = UnitExtractor(encoder, quantizer)
    if args.dedup is not None:
        extractor.dedup = args.dedup
    if isinstance(extractor.encoder, torch.nn.Module):
        extractor.encoder.to(args.device)
    return extractor


def extract(extractor: UnitExtractor, paths: list[Path], batch_size: int = 8, on_bad_file: str = "skip",
            progress: bool = True) -> Iterator[dict]:
    """Yield one record per decodable file; bad files are skipped (reported in the final 'skipped' record)
    or raise. Batches go through encoder.encode_batch when the encoder has it (HuBERT)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    skipped: list[str] = []
    columns = (TextColumn("[bold]extracting units"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[speed]}"))
    start, seconds = time.perf_counter(), 0.0
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("units", total=len(paths), speed="")
        for i in range(0, len(paths), batch_size):
            chunk, waves = [], []
            for path in paths[i : i + batch_size]:
                try:
                    wave, _ = read_audio(path, extractor.sample_rate)
                except (AudioDecodeError, OSError) as exn:
                    if on_bad_file == "raise":
                        raise
                    skipped.append(f"{path}: {exn}")
                    bar.advance(task)
                    continue
                chunk.append(path)
                waves.append(wave)
            if hasattr(extractor.encoder, "encode_batch"):
                feats = extractor.encoder.encode_batch(waves)
            else:
                feats = [extractor.encoder(w) for w in waves]
            for path, wave, f in zip(chunk, waves, feats):
                units = extractor.quantizer(f.cpu()).tolist()
                seconds += wave.numel() / extractor.sample_rate
                yield {"path": str(path), "units": dedup_units(units) if extractor.dedup else units,
                       "n_frames": len(units), "seconds": round(wave.numel() / extractor.sample_rate, 4),
                       "frame_rate": extractor.frame_rate, "deduplicated": extractor.dedup}
                bar.advance(task)
            bar.update(task, speed=f"{seconds / max(time.perf_counter() - start, 1e-9):.1f} s audio/s")
    yield {"skipped": skipped}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m most_lightning.audio.extract_units", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="audio files, folders (recursive) or @file lists")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--extractor", help="a directory written by UnitExtractor.save (e.g. a corpus's unit_extractor)")
    src.add_argument("--hubert", help="HuBERT checkpoint: fairseq .pt, transformers dir or torchaudio .safetensors")
    p.add_argument("--format", default="auto", choices=["auto", "fairseq", "hf", "torchaudio"])
    p.add_argument("--layer", default="11", help="HuBERT layer (1-based) or 'last' [11]")
    p.add_argument("--quantizer", help="k-means centroids of that layer (.npy / .pt / .safetensors); with --hubert")
    p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=None,
                   help="merge repeated consecutive units (default: the extractor's setting)")
    p.add_argument("-o", "--output", default="-", help="JSON lines file ('-' = stdout)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--on-bad-file", choices=["skip", "raise"], default="skip")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.hubert and not args.quantizer:
        p.error("--hubert needs --quantizer (the k-means centroids of the chosen layer)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extractor = build_extractor(args)
    paths = find_audio(args.inputs)
    if not paths:
        print(f"no audio files in {args.inputs}", file=sys.stderr)
        return 1
    out = sys.stdout if args.output == "-" else open(args.output, "w")
    n, skipped = 0, []
    try:
        for record in extract(extractor, paths, args.batch_size, args.on_bad_file, not args.no_progress):
            if "skipped" in record:
                skipped = record["skipped"]
                continue
            out.write(json.dumps(record) + "\n")
            n += 1
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"{n} file(s) -> {args.output}; {len(skipped)} skipped", file=sys.stderr)
    for line in skipped[:20]:
        print(f"  skipped {line}", file=sys.stderr)
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
