"""Demo chat set, built offline: dictionary dialogues from WordNet glosses and examples (/usr/share/wordnet),
written as SmolTalk-style jsonl (`<out>/source/{train,validation}.jsonl`) and prepared by the chat preparer
(voiced with flite by default), so the stage-2 recipe has speech and text instruction data without a download.

    user: What does the word "gravel" mean?        assistant: Gravel means rock fragments and pebbles.
    user: Can you use it in a sentence?            assistant: The road was covered with gravel.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from ..text_sources import WORDNET_DIR, WordNetNotFoundError
from . import chat
from .common import BadInputs

NAME, KIND = "demo_chat", "chat"
HELP = "a small offline instruction chat set from WordNet glosses, prepared like a chat corpus"
SYSTEM_PROMPT = "You are a helpful dictionary assistant."
_POS_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
_CLEAN = re.compile(r"[A-Za-z][A-Za-z ,;'-]*")  # no digits, brackets or symbols flite would spell out
_QUOTED = re.compile(r'"([^"]+)"')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-train", type=int, default=400, help="training dialogues")
    p.add_argument("--n-val", type=int, default=40, help="validation dialogues")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wordnet-dir", default=WORDNET_DIR)
    chat.add_speech_arguments(p)
    p.set_defaults(tts="flite")


def wordnet_entries(wordnet_dir: str | Path = WORDNET_DIR) -> list[tuple[str, str, str]]:
    """(word, definition, example) for synsets with a clean definition and a clean example that uses the word."""
    root = Path(wordnet_dir)
    if not all((root / f).is_file() for f in _POS_FILES):
        raise WordNetNotFoundError(f"WordNet data files not found under {root}: install them with "
                                   "`sudo apt-get install wordnet-base` or pass --wordnet-dir")
    out = set()
    for name in _POS_FILES:
        for line in (root / name).read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            word = re.sub(r"\(.*\)$", "", fields.split()[4]).replace("_", " ")
            definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
            examples = [" ".join(e.split()) for e in _QUOTED.findall(gloss)]
            examples = [e for e in examples if _CLEAN.fullmatch(e) and word.lower() in e.lower().split()]
            if examples and _CLEAN.fullmatch(definition) and 3 <= len(definition.split()) <= 20 and \
                    _CLEAN.fullmatch(word):
                out.add((word, definition, examples[0]))
    return sorted(out)


def dialogue(word: str, definition: str, example: str, with_system: bool) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": SYSTEM_PROMPT}] if with_system else []
    example = example[0].upper() + example[1:]
    return turns + [
        {"role": "user", "content": f'What does the word "{word}" mean?'},
        {"role": "assistant", "content": f"{word[0].upper() + word[1:]} means {definition}."},
        {"role": "user", "content": "Can you use it in a sentence?"},
        {"role": "assistant", "content": example if example[-1] in ".?!" else example + "."},
    ]


def write_source(out_dir: Path, n_train: int, n_val: int, seed: int, wordnet_dir: str) -> list[Path]:
    entries = wordnet_entries(wordnet_dir)
    if n_train + n_val > len(entries):
        raise ValueError(f"asked for {n_train + n_val} dialogues but WordNet gives {len(entries)} usable entries")
    random.Random(seed).shuffle(entries)
    source = out_dir / "source"
    source.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, chosen in (("validation", entries[:n_val]), ("train", entries[n_val:n_val + n_train])):
        path = source / f"{split}.jsonl"
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "w") as f:
            for i, entry in enumerate(chosen):
                f.write(json.dumps({"messages": dialogue(*entry, with_system=i % 4 == 0),
                                    "source": "wordnet-dictionary"}) + "\n")
        tmp.replace(path)
        paths.append(path)
    return paths


def prepare_demo_chat(out_dir: str | Path, n_train: int = 400, n_val: int = 40, tts: str | None = "flite",
                      units: str | Path | None = None, num_workers: int = 1, seed: int = 0) -> dict:
    """Build (or find finished) the demo chat shards in out_dir; returns the manifest. For recipes and tests:
    `units` should be the demo corpus's unit_extractor directory so unit ids match its tokenizer."""
    from .__main__ import run

    argv = ["demo_chat", "--out", str(out_dir), "--n-train", str(n_train), "--n-val", str(n_val),
            "--seed", str(seed), "--tts", tts or "none", "--num-workers", str(num_workers), "--no-progress"]
    return run(argv + (["--units", str(units)] if units else []))


def plan(args: argparse.Namespace, bad: BadInputs):
    args.inputs = write_source(Path(args.out), args.n_train, args.n_val, args.seed, args.wordnet_dir)
    args.messages_field, args.split = "messages", None
    return chat.plan(args, bad)
