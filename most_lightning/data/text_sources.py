"""Offline English text: WordNet example sentences, and the transcript normalisation used for ASR targets."""

from __future__ import annotations

import re
from pathlib import Path

WORDNET_DIR = "/usr/share/wordnet"
_POS_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
_QUOTED = re.compile(r'"([^"]+)"')
# Letters, spaces and light punctuation only: no digits, brackets or symbols whose spoken form is ambiguous.
_CLEAN = re.compile(r"[A-Za-z][A-Za-z ,.;:'?!-]*")


class WordNetNotFoundError(FileNotFoundError):
    pass


def normalize_transcript(text: str) -> str:
    """What an ASR model can hear: lower case, words and apostrophes only ("Hard-surface roads." ->
    "hard surface roads"). Use the same function on hypotheses before computing WER."""
    text = re.sub(r"[-_/]", " ", text.lower())
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    words = [w.strip("'") for w in text.split()]
    return " ".join(w for w in words if w)


def wordnet_sentences(wordnet_dir: str | Path = WORDNET_DIR, min_words: int = 3, max_words: int = 20) -> list[str]:
    """Clean example sentences quoted in WordNet glosses, deduplicated by normalised transcript, sorted.

    Sorting makes the result independent of file order, so a seeded shuffle picks the same sentences anywhere.
    """
    root = Path(wordnet_dir)
    files = [root / f for f in _POS_FILES]
    if not all(f.is_file() for f in files):
        raise WordNetNotFoundError(
            f"WordNet data files not found under {root} (need {', '.join(_POS_FILES)}): install them with "
            "`sudo apt-get install wordnet-base` (setup.sh does this) or pass wordnet_dir.")
    by_transcript: dict[str, str] = {}
    for f in files:
        for line in f.read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:  # licence header / no gloss
                continue
            for quoted in _QUOTED.findall(line.split("|", 1)[1]):
                sentence = " ".join(quoted.split())
                if not _CLEAN.fullmatch(sentence) or "--" in sentence:
                    continue
                transcript = normalize_transcript(sentence)
                if min_words <= len(transcript.split()) <= max_words:
                    by_transcript.setdefault(transcript, sentence)
    return sorted(by_transcript.values())
