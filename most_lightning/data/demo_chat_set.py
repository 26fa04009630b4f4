"""The demo chat set for stage 2, built on first use next to the demo corpus and cached.

    dm = MoSTDataModule.from_settings(sources={"chat": {"shards": "demo_chat", "tasks": {"speech_chat": 0.4}}, ...},
                                      demo_chat={"n_train": 100})  # built into <data_dir>/demo_chat/<hash>/

`shards: demo_chat` (DEMO_CHAT) in a source names this set: WordNet dictionary dialogues voiced with flite
(most_lightning.data.prepare.demo_chat), their units from the corpus's own unit extractor, so the unit ids
match the tokenizer's unit vocabulary. The cache key covers the chat recipe and the unit extractor's files:
a new recipe or a rebuilt corpus (other units) gives a new set. A file lock serialises concurrent builders
(DDP ranks, parallel tests); the preparer's manifest.json, written last, marks a finished set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .demo_corpus import _build_lock

log = logging.getLogger(__name__)

DEMO_CHAT = "demo_chat"  # the reserved `shards` value of a source that means "the built-in demo chat set"
DEMO_CHAT_VERSION = 1  # bump when the set's content changes for the same recipe
TRAIN_SHARDS = "train-*.tar"  # the preparer also writes validation-*.tar into the same directory


@dataclass(frozen=True)
class DemoChatRecipe:
    """What determines the demo chat set (besides the unit extractor); ~0.5 s per voiced dialogue to build."""

    n_train: int = 100  # dialogues (4 turns each, user and assistant turns voiced)
    n_val: int = 10
    seed: int = 0
    tts: str | None = "flite"  # null: text-only turns (text_chat only; speech_chat then has nothing to read)

    def __post_init__(self):
        if self.n_train < 1 or self.n_val < 0:
            raise ValueError(f"data.demo_chat: n_train must be >= 1 and n_val >= 0, got {self.n_train}, {self.n_val}")

    @classmethod
    def from_any(cls, value: "DemoChatRecipe | Mapping | None") -> "DemoChatRecipe":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"data.demo_chat: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**{str(k): v for k, v in value.items()})


def _files_digest(directory: Path) -> str:
    """sha256 over the names and bytes of the files in `directory` (the unit extractor: config + centroids)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no unit extractor directory; the demo chat set takes its units from "
                                "the corpus's unit_extractor/ (build the demo corpus, or give data.sources.chat.shards "
                                "a prepared chat set instead of 'demo_chat')")
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(directory)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def demo_chat_dir_for(recipe: DemoChatRecipe, data_dir: str | os.PathLike, unit_extractor: str | os.PathLike) -> Path:
    key = {"recipe": dataclasses.asdict(recipe), "version": DEMO_CHAT_VERSION}
    if recipe.tts:  # text-only sets carry no units: the extractor does not change them
        key["unit_extractor"] = _files_digest(Path(unit_extractor))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(data_dir) / DEMO_CHAT / digest


def build_demo_chat(recipe: DemoChatRecipe, data_dir: str | os.PathLike, unit_extractor: str | os.PathLike,
                    num_workers: int | None = None) -> Path:
    """The set's directory, built first unless finished (the preparer resumes an interrupted build)."""
    from .prepare.demo_chat import prepare_demo_chat

    out = demo_chat_dir_for(recipe, data_dir, unit_extractor)
    with _build_lock(out):
        if not (out / "manifest.json").is_file():
            log.info("building the demo chat set (%d + %d dialogues, tts=%s) in %s", recipe.n_train, recipe.n_val,
                     recipe.tts, out)
            prepare_demo_chat(out, recipe.n_train, recipe.n_val, tts=recipe.tts,
                              units=str(unit_extractor) if recipe.tts else None,
                              num_workers=max(1, num_workers or os.cpu_count() or 1), seed=recipe.seed)
            (out / "recipe.json").write_text(json.dumps(
                {**dataclasses.asdict(recipe), "unit_extractor": str(unit_extractor)}, indent=2))
    return out


def resolve_demo_chat(sources: Mapping[str, Any], chat_dir) -> dict[str, Any]:
    """`sources` with each `shards: demo_chat` replaced by the set's train shards; `chat_dir()` is called (and
    may build the set) only when some source uses it."""
    out: dict[str, Any] = {}
    for name, entry in sources.items():
        if isinstance(entry, Mapping) and entry.get("shards") == DEMO_CHAT:
            entry = {**entry, "shards": str(Path(chat_dir()) / TRAIN_SHARDS)}
        out[name] = entry
    return out


def uses_demo_chat(sources: Mapping[str, Any] | None) -> bool:
    return bool(sources) and any(isinstance(e, Mapping) and e.get("shards") == DEMO_CHAT for e in sources.values())
