"""The DataModule's settings as a few typed groups, and the flat `data` yaml group (conf/data) split into them.

    dm = MoSTDataModule(dataset=DatasetSettings(corpus_dir="/data/ls"), loader=LoaderSettings(batch_size=8))
    dm = MoSTDataModule.from_settings(corpus_dir="/data/ls", batch_size=8)   # the flat yaml keys, as Hydra passes

Every key of the flat group belongs to exactly one group (its field of the same name), so `data.batch_size=8` on
the command line keeps working while the constructor takes six objects. An unknown key is refused, naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .batching import BATCHINGS
from .continuous import AudioFrontendConfig
from .demo_chat_set import DemoChatRecipe
from .demo_corpus import DemoCorpusRecipe
from .samples import BadSamplePolicy
from .shard_reader import VERIFY_SHARDS
from .tasks import TASKS

DEFAULT_TASK_WEIGHTS = {"asr": 0.4, "tts": 0.4, "text": 0.2}  # stage-1 mix of the reference


def plain(value: Any) -> Any:
    """DictConfig/ListConfig (from Hydra) -> dict/list; leaves other values alone."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _choice(where: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{where}={value!r}: allowed values are {', '.join(allowed)}")


@dataclass(frozen=True)
class TokenizerSettings:
    """from_base: a pretrained model's dir (tokenizer.json): its tokenizer + unit/audio tokens instead of the
    corpus's BPE (text.tokenizer); null = the corpus tokenizer."""
    from_base: str | None = None
    bos_token: str | None = None  # null: from tokenizer_config.json
    eos_token: str | None = None


@dataclass(frozen=True)
class DatasetSettings:
    """Which corpus: the demo recipe built under data_dir, or a prepared corpus_dir; its tokenizer; the demo chat
    set that a source with `shards: demo_chat` reads."""
    data_dir: str = "data"
    corpus: DemoCorpusRecipe = field(default_factory=DemoCorpusRecipe)  # ignored when corpus_dir is given
    corpus_dir: str | None = None
    demo_chat: DemoChatRecipe = field(default_factory=DemoChatRecipe)
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    build_workers: int | None = None
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "data_dir", str(self.data_dir))
        object.__setattr__(self, "corpus_dir", str(self.corpus_dir) if self.corpus_dir else None)
        object.__setattr__(self, "corpus", DemoCorpusRecipe.from_any(plain(self.corpus)))
        object.__setattr__(self, "demo_chat", DemoChatRecipe.from_any(plain(self.demo_chat)))
        object.__setattr__(self, "tokenizer", settings_from(TokenizerSettings, self.tokenizer, "data.tokenizer"))


@dataclass(frozen=True)
class LoaderSettings:
    """How examples become batches (data/batching.py) and how the DataLoaders run."""
    batch_size: int = 16
    eval_batch_size: int | None = None  # None: batch_size
    num_workers: int = 0
    pin_memory: bool = False
    batching: str = "fixed"  # fixed | bucket | pack
    max_tokens: int | None = None  # token budget per batch for bucket / pack
    bucket_pool: int = 256

    def __post_init__(self):
        _choice("data.batching", self.batching, BATCHINGS)
        object.__setattr__(self, "batch_size", int(self.batch_size))
        object.__setattr__(self, "eval_batch_size", int(self.eval_batch_size or self.batch_size))


@dataclass(frozen=True)
class StreamSettings:
    """The training stream (data/pipeline.py): what it mixes, how shards are read, and where a resumed run starts.
    sources null = the corpus's train split mixed by task_weights (MoSTDataModule.source_specs)."""
    sources: dict[str, Any] | None = None
    task_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    shard_sampling: str = "split"  # split | resampled
    batches_per_epoch: int | None = None  # None: ~one pass of the train speech (1000 with named sources)
    shuffle_buffer: int = 500
    shuffle_shards: bool = True
    few_shards: str = "stride"  # stride | error
    resume_data_position: bool = True
    seed: int = 0

    def __post_init__(self):
        weights = {str(k): float(v) for k, v in dict(plain(self.task_weights) or DEFAULT_TASK_WEIGHTS).items()}
        unknown = sorted(set(weights) - set(TASKS))
        if unknown or not any(w > 0 for w in weights.values()):
            raise ValueError(f"task_weights {weights} must give positive weight to some of {TASKS} "
                             f"and name no other task{f' (unknown: {unknown})' if unknown else ''}")
        object.__setattr__(self, "task_weights", weights)
        object.__setattr__(self, "sources", plain(self.sources))
        _choice("data.shard_sampling", self.shard_sampling, ("split", "resampled"))
        _choice("data.few_shards", self.few_shards, ("stride", "error"))
        object.__setattr__(self, "seed", int(self.seed))


@dataclass(frozen=True)
class QualitySettings:
    """What counts as a bad input and what happens to it (data/samples.py, data/shard_reader.py)."""
    max_length: int | None = 1024
    max_length_policy: str = "drop"  # drop (a bad sample) | truncate (counted in n_truncated)
    on_bad_sample: str = "skip"  # skip (counted by kind) | raise
    verify: str = "size"  # shard checks against their manifest: size | sha256 | none
    verify_audio: str = "header"  # none | header | full
    dedup_units: bool = True

    def __post_init__(self):
        BadSamplePolicy(self.on_bad_sample)
        _choice("data.max_length_policy", self.max_length_policy, ("drop", "truncate"))
        _choice("data.verify", self.verify, VERIFY_SHARDS)
        _choice("data.verify_audio", self.verify_audio, ("none", "header", "full"))


@dataclass(frozen=True)
class EvalSettings:
    """The in-memory validation and test sets."""
    val_tasks: tuple[str, ...] = TASKS
    val_limit: int | None = None  # utterances per task; None = the whole split
    test_limit: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "val_tasks", tuple(plain(self.val_tasks)))
        bad = [t for t in self.val_tasks if t not in TASKS]
        if bad:
            raise ValueError(f"unknown val_tasks {bad}; known: {TASKS}")


GROUPS = {"dataset": DatasetSettings, "loader": LoaderSettings, "stream": StreamSettings,
          "quality": QualitySettings, "evaluation": EvalSettings}
# flat key of conf/data -> its group; `audio` (conf/audio, passed in by run.py) is a group of its own
KEY_GROUP = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
assert len(KEY_GROUP) == sum(len(dataclasses.fields(c)) for c in GROUPS.values()), "a key in two groups"


def settings_from(cls: type, value: Any, where: str) -> Any:
    """An instance of the settings dataclass `cls` from itself, None (defaults) or a mapping of its fields;
    an unknown key is refused, naming it and the class."""
    value = plain(value)
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{where}: expected {cls.__name__} or a mapping of its fields, got {type(value).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in value if k not in known and k != "_target_")
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {known}")
    return cls(**{str(k): v for k, v in value.items() if k != "_target_"})


def split_flat_settings(settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The flat data group {batch_size: 8, sources: ..., audio: ...} -> {group: {key: value}}; an unknown key is
    refused, naming it."""
    groups: dict[str, dict[str, Any]] = {name: {} for name in (*GROUPS, "audio")}
    for key, value in plain(dict(settings)).items():
        if key == "_target_":
            continue
        if key == "audio":
            groups["audio"] = value
        elif key in KEY_GROUP:
            groups[KEY_GROUP[key]][key] = value
        else:
            raise ValueError(f"data.{key}: unknown data setting; known: {sorted([*KEY_GROUP, 'audio'])}")
    return groups


def build_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The flat data group -> the constructor's typed groups (dataset, loader, stream, quality, evaluation, audio)."""
    groups = split_flat_settings(settings)
    out: dict[str, Any] = {name: settings_from(GROUPS[name], groups[name], "data") for name in GROUPS}
    out["audio"] = AudioFrontendConfig.from_any(groups["audio"] or None)
    return out
