"""Demo minimal-pair sets voiced with flite, written in the benchmarks' own layouts (so the same readers run):

  lexical    (sWUGGY-like, ZeroSpeech layout)  a word heard in training vs a non-word made from it by swapping
             its vowels (not in the training vocabulary)
  syntactic  (sBLIMP-like, ZeroSpeech layout)  a held-out sentence vs the same words with two neighbours swapped
  shuffled   (StoryCloze-like, paired wavs)    a held-out sentence vs its words in a seeded random order

    python -m most_lightning.eval.demo_pairs --corpus-dir data/demo/<hash> --out demo_pairs --n 40
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import subprocess
from pathlib import Path
from typing import Sequence

from most_lightning.data.flite import flite_binary

KINDS = ("lexical", "syntactic", "shuffled")
_VOWELS = "aeiou"


def nonword(word: str, vocabulary: set[str], rng: random.Random) -> str | None:
    """Change vowels of `word` until it is not a known word (None if no such change exists)."""
    positions = [i for i, c in enumerate(word) if c in _VOWELS]
    if not positions:
        return None
    for _ in range(20):
        chars = list(word)
        for i in rng.sample(positions, k=max(1, len(positions) // 2)):
            chars[i] = rng.choice([v for v in _VOWELS if v != word[i]])
        candidate = "".join(chars)
        if candidate not in vocabulary:
            return candidate
    return None


def swap_neighbours(words: list[str], rng: random.Random) -> list[str] | None:
    options = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
    if not options:
        return None
    i = rng.choice(options)
    out = list(words)
    out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _say(text: str, wav: Path, voice: str) -> None:
    subprocess.run([flite_binary(), "-voice", voice, "-t", text, "-o", str(wav)], check=True, capture_output=True)


def build_demo_pairs(kind: str, out_dir: str | Path, sentences: Sequence[str], train_texts: Sequence[str],
                     n_items: int = 40, voice: str = "slt", seed: int = 0) -> Path:
    """Write one demo set; returns its directory (ZeroSpeech layout for lexical/syntactic, paired wavs else)."""
    if kind not in KINDS:
        raise ValueError(f"demo pair kind={kind!r}: known kinds are {KINDS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}/{kind}")
    vocabulary = {w for t in train_texts for w in re.findall(r"[a-z']+", t.lower())}
    if kind == "lexical":
        counts: dict[str, int] = {}
        for t in train_texts:
            for w in re.findall(r"[a-z]+", t.lower()):
                counts[w] = counts.get(w, 0) + 1
        words = sorted((w for w in counts if len(w) >= 4), key=lambda w: (-counts[w], w))
        rows = []
        for w in words:
            if len(rows) >= 2 * n_items:
                break
            fake = nonword(w, vocabulary, rng)
            if fake is None:
                continue
            item = f"{len(rows) // 2:04d}"
            for text, correct in ((w, 1), (fake, 0)):
                name = f"{item}_{'w' if correct else 'nw'}"
                _say(text, out / f"{name}.wav", voice)
                rows.append({"id": item, "filename": name, "voice": voice, "word": text, "correct": correct})
        _write_gold(out, rows, ["id", "filename", "voice", "word", "correct"])
        return out
    items = []
    for s in sentences:
        words = s.split()
        bad = swap_neighbours(words, rng) if kind == "syntactic" else rng.sample(words, len(words))
        if bad and bad != words:
            items.append((s, " ".join(bad)))
        if len(items) >= n_items:
            break
    rows = []
    for i, (good, bad) in enumerate(items):
        item = f"{i:04d}"
        if kind == "shuffled":
            _say(good, out / f"{item}_correct.wav", voice)
            _say(bad, out / f"{item}_incorrect.wav", voice)
            continue
        for text, correct in ((good, 1), (bad, 0)):
            name = f"{item}_{correct}"
            _say(text, out / f"{name}.wav", voice)
            rows.append({"id": item, "filename": name, "voice": voice, "sentence": text, "correct": correct})
    if kind == "syntactic":
        _write_gold(out, rows, ["id", "filename", "voice", "sentence", "correct"])
    return out


def _write_gold(out: Path, rows: list[dict], columns: list[str]) -> None:
    with (out / "gold.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def corpus_texts(datamodule) -> tuple[list[str], list[str]]:
    """(held-out test sentences, training transcripts) of a prepared corpus."""
    test, _ = datamodule.speech_records("test")
    train, _ = datamodule.speech_records("train")
    return list(dict.fromkeys(r.transcript for r in test)), [r.transcript for r in train]


def main(argv: Sequence[str] | None = None) -> None:
    from most_lightning.data import MoSTDataModule

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-dir", required=True, help="a prepared corpus (directory with manifest.json)")
    parser.add_argument("--out", default="demo_pairs")
    parser.add_argument("--n", type=int, default=40, help="pairs per set")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--voice", default="slt")
    args = parser.parse_args(argv)
    sentences, train = corpus_texts(MoSTDataModule.from_settings(corpus_dir=args.corpus_dir))
    for kind in args.kinds:
        print(build_demo_pairs(kind, Path(args.out) / kind, sentences, train, args.n, args.voice))


if __name__ == "__main__":
    main()
