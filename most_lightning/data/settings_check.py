"""Check the data group (conf/data, MoSTDataModule's settings) before anything is built.

run.py calls `check_data_config` right after Hydra composes the config, before the corpus, the tokenizer or the
Trainer exist: a batch size of 0, a token budget smaller than a packed row, a task weight below zero or a shard
pattern that matches nothing fails in a second with the field (`data.<key>`) and what it allows, instead of a
bare error minutes later. The allowed choices and integer ranges are the typed settings' own (data/settings.py:
CHOICES, INTEGERS), which check the same fields again when the DataModule is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .settings import CHOICES, INTEGERS, DataConfigError, check_choice, check_integer, plain, split_flat_settings
from .tasks import ALL_TASKS, TASK_KIND, TASKS

DATAMODULE_TARGET = "most_lightning.data.MoSTDataModule.from_settings"
DEMO_CHAT = "demo_chat"  # the shards value that names the demo chat set (built on first use)


def check_weights(where: str, weights: Any, known: tuple[str, ...], need_positive: bool = True) -> dict[str, float]:
    """{task: weight} with known tasks and finite weights >= 0 (some > 0 if need_positive)."""
    if not isinstance(weights, Mapping) or not weights:
        raise DataConfigError(f"{where}={weights!r}: must be a mapping {{task: weight}} over {list(known)}")
    unknown = sorted(str(k) for k in weights if k not in known)
    if unknown:
        raise DataConfigError(f"{where}: unknown task(s) {unknown}; allowed: {list(known)}")
    out = {}
    for task, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise DataConfigError(f"{where}.{task}={weight!r}: a weight must be a finite number >= 0")
        out[str(task)] = float(weight)
    if need_positive and not any(w > 0 for w in out.values()):
        raise DataConfigError(f"{where}={out}: give at least one task a weight > 0")
    return out


def check_shard_patterns(where: str, shards: Any, root: Path | None) -> None:
    """Non-empty patterns with balanced braces; those that can be resolved now (absolute, or under an existing
    corpus directory) must match at least one shard."""
    from .sources import resolve_shards

    patterns = [shards] if isinstance(shards, str) else shards
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p.strip() for p in patterns):
        raise DataConfigError(f"{where}={shards!r}: must be a shard path, glob, brace pattern or directory, or a "
                              "non-empty list of them")
    for pattern in patterns:
        if pattern.count("{") != pattern.count("}"):
            raise DataConfigError(f"{where}: unbalanced braces in {pattern!r} (brace patterns look like "
                                  "train-{00000..00009}.tar)")
        if Path(pattern).expanduser().is_absolute() or root is not None:
            try:
                resolve_shards(pattern, root=root, name=where)
            except FileNotFoundError as err:
                raise DataConfigError(f"{where}: {err}") from None


def check_sources(sources: Any, root: Path | None) -> None:
    if sources is None:
        return
    if not isinstance(sources, Mapping) or not sources:
        raise DataConfigError(f"data.sources={sources!r}: must be null or a mapping {{name: {{shards: <paths/globs>, "
                              "tasks: {<task>: <weight>}}}}")
    any_positive = False
    for name, entry in sources.items():
        where = f"data.sources.{name}"
        if not isinstance(entry, Mapping) or not {"shards", "tasks"} <= set(entry):
            raise DataConfigError(f"{where}={entry!r}: must be {{shards: <paths/globs>, tasks: {{<task>: <weight>}}}}")
        if set(entry) - {"shards", "tasks"}:
            raise DataConfigError(f"{where}: unknown keys {sorted(set(entry) - {'shards', 'tasks'})}; a source has "
                                  "shards and tasks")
        weights = check_weights(f"{where}.tasks", entry["tasks"], ALL_TASKS, need_positive=False)
        kinds = sorted({TASK_KIND[t] for t in weights})
        if len(kinds) > 1:
            raise DataConfigError(f"{where}.tasks mixes record kinds {kinds}: a shard set holds one kind, speech "
                                  "(asr, tts, speech_lm), text (text) or chat (text_chat, speech_chat)")
        any_positive |= any(w > 0 for w in weights.values())
        if entry["shards"] != DEMO_CHAT:
            check_shard_patterns(f"{where}.shards", entry["shards"], root)
    if not any_positive:
        raise DataConfigError("data.sources: no task of any source has a weight > 0")


def check_data_config(data: Any, max_positions: int | None = None) -> None:
    """Raise DataConfigError naming the first bad setting of the data group (MoSTDataModule only; another
    `_target_` is the user's own). max_positions: the model's max_position_embeddings (bounds data.max_length)."""
    data = plain(data)
    if not isinstance(data, Mapping) or data.get("_target_") != DATAMODULE_TARGET:
        return
    try:
        split_flat_settings(data)  # every key belongs to one typed settings group
    except ValueError as err:
        raise DataConfigError(str(err)) from None
    for key, (minimum, allow_null) in INTEGERS.items():
        if key in data:
            check_integer(f"data.{key}", data[key], minimum, allow_null)
    for key, allowed in CHOICES.items():
        if key in data:
            check_choice(f"data.{key}", data[key], allowed)
    max_length, max_tokens, batching = data.get("max_length"), data.get("max_tokens"), data.get("batching", "fixed")
    if max_positions is not None and max_length is not None and max_length > max_positions:
        raise DataConfigError(f"data.max_length={max_length}: must be <= the model's max_position_embeddings "
                              f"({max_positions})")
    if batching in ("bucket", "pack") and max_tokens is None:
        raise DataConfigError(f"data.max_tokens=null: data.batching={batching} needs a token budget per batch (an "
                              "integer >= 1)")
    if batching == "pack" and (max_length is None or max_length > max_tokens):
        raise DataConfigError(f"data.max_length={max_length}: data.batching=pack needs the row length "
                              f"data.max_length <= data.max_tokens ({max_tokens})")
    if "task_weights" in data and data["task_weights"] is not None:
        check_weights("data.task_weights", data["task_weights"], TASKS)
    val_tasks = data.get("val_tasks")
    if val_tasks is not None and (not isinstance(val_tasks, list) or not set(val_tasks) <= set(TASKS)):
        raise DataConfigError(f"data.val_tasks={val_tasks!r}: must be a list of tasks from {list(TASKS)}")
    tokenizer = data.get("tokenizer") or {}
    if not isinstance(tokenizer, Mapping) or set(tokenizer) - {"from_base", "bos_token", "eos_token"}:
        raise DataConfigError(f"data.tokenizer={tokenizer!r}: allowed keys are from_base, bos_token, eos_token")
    root = None  # relative shard patterns are checked now only under a given corpus_dir (the demo corpus may not
    corpus_dir = data.get("corpus_dir")  # be built yet: MoSTDataModule.setup checks them after the build)
    if corpus_dir is not None:
        root = Path(str(corpus_dir)).expanduser()
        if not (root / "manifest.json").is_file():
            raise DataConfigError(f"data.corpus_dir={str(corpus_dir)!r}: no manifest.json there; give a corpus "
                                  "prepared with python -m most_lightning.data.prepare, or null for the demo corpus")
    else:
        from .demo_corpus import DemoCorpusRecipe

        try:
            DemoCorpusRecipe.from_any(data.get("corpus"))
        except (TypeError, ValueError) as err:
            raise DataConfigError(f"data.corpus: {err}") from None
    check_sources(data.get("sources"), root)
