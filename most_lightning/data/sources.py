"""Named data sources: a shard set (paths, globs, brace patterns or directories) and the tasks made from it.

    sources = parse_sources({
        "libri": {"shards": "speech/train-{00000..00004}.tar", "tasks": {"asr": 0.4, "tts": 0.4}},
        "web":   {"shards": ["/data/web/*.tar"], "tasks": {"text": 0.2}},
        "chat":  {"shards": "/data/demo_chat", "tasks": {"speech_chat": 0.4, "text_chat": 0.4}},
    }, root="/data/corpus")
Relative paths are taken from `root`; a directory means all its `*.tar`. The weights of all (source, task)
pairs together are the stage's mix (they need not sum to 1).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from .tasks import ALL_TASKS, TASK_KIND, TASKS


@dataclass(frozen=True)
class SourceSpec:
    name: str
    shards: tuple[str, ...]
    tasks: tuple[tuple[str, float], ...]  # (task, weight), weight > 0

    @property
    def kind(self) -> str:
        return TASK_KIND[self.tasks[0][0]]


def resolve_shards(patterns: str | list[str], root: str | os.PathLike | None = None, name: str = "?") -> list[str]:
    """Absolute shard paths, in a stable order; FileNotFoundError naming the pattern if nothing matches."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [str(patterns)]
    out: list[str] = []
    for pattern in patterns:
        for expanded in braceexpand(str(pattern)):
            path = Path(expanded).expanduser()
            if not path.is_absolute() and root is not None:
                path = Path(root) / path
            if path.is_dir():
                found = sorted(str(p) for p in path.glob("*.tar"))
            elif glob.has_magic(str(path)):
                found = sorted(glob.glob(str(path)))
            else:
                found = [str(path)] if path.is_file() else []
            if not found:
                raise FileNotFoundError(
                    f"data source {name!r}: no shard matches {str(path)!r} (from {pattern!r}). Prepare the shards "
                    f"first (python -m most_lightning.data.prepare ...) or fix data.sources.{name}.shards")
            out += found
    return list(dict.fromkeys(out))  # a shard named twice is read once


def parse_sources(config: Mapping[str, Any], root: str | os.PathLike | None = None) -> list[SourceSpec]:
    """{name: {shards: ..., tasks: {task: weight}}} -> validated SourceSpecs (zero-weight tasks dropped)."""
    if not config:
        raise ValueError("data.sources is empty: name at least one source with shards and tasks")
    specs = []
    for name, entry in config.items():
        if not isinstance(entry, Mapping) or "shards" not in entry or "tasks" not in entry:
            raise ValueError(f"data.sources.{name} must be {{shards: <paths/globs>, tasks: {{<task>: <weight>}}}}, "
                             f"got {entry!r}")
        tasks = dict(entry["tasks"])
        unknown = sorted(set(tasks) - set(ALL_TASKS))
        if unknown:
            raise ValueError(f"data.sources.{name}.tasks: unknown task(s) {unknown}; known: {list(ALL_TASKS)}")
        if any(float(w) < 0 for w in tasks.values()):
            raise ValueError(f"data.sources.{name}.tasks: weights must be >= 0, got {tasks}")
        kinds = {TASK_KIND[t] for t in tasks}
        if len(kinds) > 1:
            raise ValueError(f"data.sources.{name}.tasks mixes record kinds {sorted(kinds)} ({tasks}); a shard set "
                             "holds one kind: speech (asr, tts, speech_lm), text (text) or chat (text_chat, "
                             "speech_chat)")
        positive = tuple((str(t), float(w)) for t, w in tasks.items() if float(w) > 0)
        if not positive:
            continue  # a source switched off for this stage
        specs.append(SourceSpec(str(name), tuple(resolve_shards(entry["shards"], root, name)), positive))
    if not specs:
        raise ValueError(f"data.sources gives no task a positive weight: {dict(config)}")
    return specs


def corpus_sources(speech_shards: list[str], text_shards: list[str],
                   task_weights: Mapping[str, float]) -> list[SourceSpec]:
    """The default sources of a corpus: its train speech shards as source `speech` (tasks asr, tts) and its text
    shards as source `text` (task text), weighted by task_weights (zero-weight tasks and sources dropped)."""
    unknown = sorted(set(task_weights) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in task_weights; known: {TASKS}")
    specs = []
    for name, shards in (("speech", speech_shards), ("text", text_shards)):
        tasks = tuple((t, float(task_weights[t])) for t in TASKS
                      if TASK_KIND[t] == name and float(task_weights.get(t, 0)) > 0)
        if not tasks:
            continue
        if not shards:
            raise ValueError(f"task_weights asks for {[t for t, _ in tasks]} but the corpus has no {name} shards")
        specs.append(SourceSpec(name, tuple(shards), tasks))
    if not specs:
        raise ValueError(f"task_weights {dict(task_weights)} gives no task a positive weight")
    return specs
