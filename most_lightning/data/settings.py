"""The DataModule's settings as a few typed groups, and the flat `data` yaml group (conf/data) split into them.

    dm = MoSTDataModule(dataset=DatasetSettings(corpus_dir="/data/ls"), loader=LoaderSettings(batch_size=8))
    dm = MoSTDataModule.from_settings(corpus_dir="/data/ls", batch_size=8)   # the flat yaml keys, as Hydra passes

Every key of the flat group belongs to exactly one group (its field of the same name), so `data.batch_size=8` on
the command line keeps working while the constructor takes six objects. An unknown key is refused, naming it.

The fields say what they allow, once: a choice is typed with a Literal (its values), an integer with a minimum
carries it in its field (`at_least`; `| None` in the type allows null). Each group checks its fields from that,
and settings_check reads the same `CHOICES` and `INTEGERS` to check a composed config before anything is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .batching import Batching
from .continuous import AudioFrontendConfig
from .demo_chat_set import DemoChatRecipe
from .demo_corpus import DemoCorpusRecipe
from .pipeline import FewShards, ShardSampling
from .samples import OnBadSample, VerifyAudio
from .shard_reader import VerifyShards
from .tasks import TASKS, MaxLengthPolicy

DEFAULT_TASK_WEIGHTS = {"asr": 0.4, "tts": 0.4, "text": 0.2}  # stage-1 mix of the reference


def plain(value: Any) -> Any:
    """DictConfig/ListConfig (from Hydra) -> dict/list; leaves other values alone."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


class DataConfigError(ValueError):
    """A data setting that cannot work; the message names the field and what it allows."""


def check_choice(where: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise DataConfigError(f"{where}={value!r}: allowed values are {list(allowed)}")


def check_integer(where: str, value: Any, minimum: int, allow_null: bool) -> None:
    if value is None and allow_null:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if allow_null else "")
        raise DataConfigError(f"{where}={value!r}: must be {allowed}")


def at_least(minimum: int, default: int | None) -> Any:
    """An integer field and its minimum (read by `integer_fields`)."""
    return field(default=default, metadata={"minimum": minimum})


@cache
def choice_fields(cls: type) -> dict[str, tuple[Any, ...]]:
    """{field: allowed values} for the fields of settings class `cls` typed with a Literal."""
    hints = get_type_hints(cls)
    return {f.name: get_args(hints[f.name]) for f in dataclasses.fields(cls) if get_origin(hints[f.name]) is Literal}


@cache
def integer_fields(cls: type) -> dict[str, tuple[int, bool]]:
    """{field: (minimum, null allowed)} for the integer fields of settings class `cls` that declare a minimum."""
    hints = get_type_hints(cls)
    return {f.name: (f.metadata["minimum"], type(None) in get_args(hints[f.name]))
            for f in dataclasses.fields(cls) if "minimum" in f.metadata}


def check_fields(settings: Any) -> None:
    """Every choice and integer field of a settings instance against what its type and minimum allow."""
    cls = type(settings)
    for name, allowed in choice_fields(cls).items():
        check_choice(f"data.{name}", getattr(settings, name), allowed)
    for name, (minimum, allow_null) in integer_fields(cls).items():
        check_integer(f"data.{name}", getattr(settings, name), minimum, allow_null)


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
    build_workers: int | None = at_least(1, None)
    progress: bool = True

    def __post_init__(self):
        check_fields(self)
        object.__setattr__(self, "data_dir", str(self.data_dir))
        object.__setattr__(self, "corpus_dir", str(self.corpus_dir) if self.corpus_dir else None)
        object.__setattr__(self, "corpus", DemoCorpusRecipe.from_any(plain(self.corpus)))
        object.__setattr__(self, "demo_chat", DemoChatRecipe.from_any(plain(self.demo_chat)))
        object.__setattr__(self, "tokenizer", settings_from(TokenizerSettings, self.tokenizer, "data.tokenizer"))


@dataclass(frozen=True)
class LoaderSettings:
    """How examples become batches (data/batching.py) and how the DataLoaders run."""
    batch_size: int = at_least(1, 16)
    eval_batch_size: int | None = at_least(1, None)  # None: batch_size
    num_workers: int = at_least(0, 0)
    pin_memory: bool = False
    batching: Batching = "fixed"
    max_tokens: int | None = at_least(1, None)  # token budget per batch for bucket / pack
    bucket_pool: int = at_least(1, 256)

    def __post_init__(self):
        check_fields(self)
        object.__setattr__(self, "eval_batch_size", self.eval_batch_size or self.batch_size)


@dataclass(frozen=True)
class StreamSettings:
    """The training stream (data/pipeline.py): what it mixes, how shards are read, and where a resumed run starts.
    sources null = the corpus's train split mixed by task_weights (MoSTDataModule.source_specs)."""
    sources: dict[str, Any] | None = None
    task_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    shard_sampling: ShardSampling = "split"
    batches_per_epoch: int | None = at_least(1, None)  # None: ~one pass of the train speech (1000 with named sources)
    shuffle_buffer: int = at_least(0, 500)
    shuffle_shards: bool = True
    few_shards: FewShards = "stride"
    resume_data_position: bool = True
    seed: int = 0

    def __post_init__(self):
        check_fields(self)
        weights = {str(k): float(v) for k, v in dict(plain(self.task_weights) or DEFAULT_TASK_WEIGHTS).items()}
        unknown = sorted(set(weights) - set(TASKS))
        if unknown or not any(w > 0 for w in weights.values()):
            raise ValueError(f"task_weights {weights} must give positive weight to some of {TASKS} "
                             f"and name no other task{f' (unknown: {unknown})' if unknown else ''}")
        object.__setattr__(self, "task_weights", weights)
        object.__setattr__(self, "sources", plain(self.sources))
        object.__setattr__(self, "seed", int(self.seed))


@dataclass(frozen=True)
class QualitySettings:
    """What counts as a bad input and what happens to it (data/samples.py, data/shard_reader.py)."""
    max_length: int | None = at_least(1, 1024)
    max_length_policy: MaxLengthPolicy = "drop"  # drop (a bad sample) | truncate (counted in n_truncated)
    on_bad_sample: OnBadSample = "skip"  # skip (counted by kind) | raise
    verify: VerifyShards = "size"  # shard checks against their manifest (data/shard_reader.py)
    verify_audio: VerifyAudio = "header"
    dedup_units: bool = True

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class EvalSettings:
    """The in-memory validation and test sets."""
    val_tasks: tuple[str, ...] = TASKS
    val_limit: int | None = at_least(1, None)  # utterances per task; None = the whole split
    test_limit: int | None = at_least(1, None)

    def __post_init__(self):
        check_fields(self)
        object.__setattr__(self, "val_tasks", tuple(plain(self.val_tasks)))
        bad = [t for t in self.val_tasks if t not in TASKS]
        if bad:
            raise ValueError(f"unknown val_tasks {bad}; known: {TASKS}")


GROUPS = {"dataset": DatasetSettings, "loader": LoaderSettings, "stream": StreamSettings,
          "quality": QualitySettings, "evaluation": EvalSettings}
# flat key of conf/data -> its group; `audio` (conf/audio, passed in by run.py) is a group of its own
KEY_GROUP = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
assert len(KEY_GROUP) == sum(len(dataclasses.fields(c)) for c in GROUPS.values()), "a key in two groups"
# flat key -> what it allows, from the groups' fields (settings_check checks a composed config with them)
CHOICES = {name: allowed for cls in GROUPS.values() for name, allowed in choice_fields(cls).items()}
INTEGERS = {name: bounds for cls in GROUPS.values() for name, bounds in integer_fields(cls).items()}


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
