"""LibriSpeech: `<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac` + `<speaker>-<chapter>.trans.txt`.

Give split directories (`LibriSpeech/train-clean-100`) or the `LibriSpeech` directory holding them; the split
is the directory name. Each trans.txt line is `<utterance-id> <TRANSCRIPT>`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import BadInputs, Skip, SpeechItem, UniqueKeys, check_text, sample_key

NAME, KIND = "librispeech", "speech"
HELP = "LibriSpeech directory layout (speaker/chapter/*.flac + *.trans.txt)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, help="split directories, or the LibriSpeech directory")


def split_dirs(paths: list[Path]) -> list[Path]:
    out = []
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory: give LibriSpeech split directories "
                                    "(e.g. LibriSpeech/dev-clean) or the LibriSpeech directory")
        if next(path.glob("*/*/*.trans.txt"), None) is not None:
            out.append(path)
        else:
            out += [d for d in sorted(path.iterdir()) if d.is_dir() and next(d.glob("*/*/*.trans.txt"), None)]
    if not out:
        raise FileNotFoundError(f"no LibriSpeech split directory (with <speaker>/<chapter>/*.trans.txt) under "
                                f"{[str(p) for p in paths]}")
    return out


def plan(args: argparse.Namespace, bad: BadInputs) -> dict[str, list[SpeechItem]]:
    items: dict[str, list[SpeechItem]] = {}
    keys = UniqueKeys()
    for split_dir in split_dirs(args.inputs):
        split = split_dir.name
        bad.split = split
        for trans in sorted(split_dir.glob("*/*/*.trans.txt")):
            listed: set[str] = set()
            for n, line in enumerate(trans.read_bytes().splitlines(), 1):
                raw_key, _, raw_text = line.partition(b" ")
                utt = raw_key.decode("ascii", "replace").strip()
                if not utt:
                    continue
                key = sample_key(utt)
                listed.add(utt)
                try:
                    text = check_text(key, raw_text)
                    keys.check(key, f"{trans}:{n}")
                except Skip as skip:
                    bad.skip(key, skip.reason, f"{trans}:{n}: {skip.detail}")
                    continue
                audio = trans.parent / f"{utt}.flac"
                speaker, chapter = trans.parent.parent.name, trans.parent.name
                items.setdefault(split, []).append(SpeechItem(
                    key=key, audio=str(audio), text=text,
                    meta={"id": utt, "speaker": speaker, "chapter": chapter, "split": split},
                    est_bytes=audio.stat().st_size if audio.is_file() else 0))
            for audio in sorted(trans.parent.glob("*.flac")):  # audio the transcript file does not list
                if audio.stem not in listed:
                    bad.skip(sample_key(audio.stem), "no_transcript", f"{audio}: no line in {trans.name}")
    return items
