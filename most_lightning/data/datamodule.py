"""MoSTDataModule: corpus -> tokenizer -> streamed, mixed, padded batches of the interface contract.

    dm = MoSTDataModule.from_settings(data_dir="data", corpus={"n_train": 1000}, batch_size=16)  # flat yaml keys
    dm = MoSTDataModule(dataset=DatasetSettings(...), loader=LoaderSettings(batch_size=16))     # typed groups
    dm.tokenizer.vocab_size        # builds/loads the corpus on first use; needed before the model exists
    trainer.fit(model, datamodule=dm)

Training has one stream, SourceMixStream (data/pipeline.py), over named sources (docs/data_pipeline.md): the
user's `sources`, or by default the corpus's train speech (ASR/TTS) and text shards mixed by `task_weights`. It
is endless, reads explicitly assigned shards per rank and worker, yields a fixed number of batches per epoch,
batches by `batching` (fixed, bucket or pack), counts bad samples by kind, and its data position is saved in
Lightning checkpoints (`state_dict`) and restored on resume. With continuous audio (MoST-C) its ASR examples carry
waveforms and frame slots.
Validation and test read their (small) splits into memory and are map-style, so a single device makes one
exact pass and Lightning's DistributedSampler splits them under DDP (padding the last rank with repeats).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from ..text.tokenizer import MoSTTokenizer
from .collate import GenerationCollator, TeacherForcedCollator
from .continuous import AudioFrontendConfig, ContinuousASRFormatter, frame_counter
from .demo_chat_set import build_demo_chat, resolve_demo_chat, uses_demo_chat
from .demo_corpus import build_demo_corpus, corpus_dir_for, load_manifest
from .pipeline import ResumableLoader, SourceMixStream
from .samples import BadSamplePolicy, OverlongSampleError, SpeechRecord, decode_speech_sample, iter_records
from .settings import (DEFAULT_TASK_WEIGHTS, DatasetSettings, EvalSettings, LoaderSettings, QualitySettings,
                       StreamSettings, build_settings, plain, settings_from)
from .sources import SourceSpec, corpus_sources, parse_sources, resolve_shards
from .tasks import TASKS, Example, GenerationExample, TaskFormatter

__all__ = ["DEFAULT_TASK_WEIGHTS", "MoSTDataModule", "derangement"]
SOURCES_BATCHES_PER_EPOCH = 1000  # named sources have no natural pass length


class ListDataset(Dataset):
    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation with no fixed point (Sattolo's algorithm: one random n-cycle); n >= 2."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    perm = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def mismatch_units(records: Sequence[SpeechRecord], seed: int) -> list[list[int]]:
    """For each record, the units of an utterance of a DIFFERENT sentence (deterministic): the text-prior baseline."""
    return [records[i].units for i in mismatch_donors(records, seed)]


def mismatch_donors(records: Sequence[SpeechRecord], seed: int) -> list[int]:
    """For each record, the index of an utterance of a DIFFERENT sentence (deterministic)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.transcript, []).append(i)
    names = list(groups)
    position = {name: i for i, name in enumerate(names)}
    perm = derangement(len(names), seed)
    out = []
    for i, r in enumerate(records):
        donors = groups[names[perm[position[r.transcript]]]]
        out.append(donors[i % len(donors)])
    return out


class MoSTDataModule(LightningDataModule):
    def __init__(
        self,
        dataset: DatasetSettings | Mapping | None = None,
        loader: LoaderSettings | Mapping | None = None,
        stream: StreamSettings | Mapping | None = None,
        quality: QualitySettings | Mapping | None = None,
        evaluation: EvalSettings | Mapping | None = None,
        audio: AudioFrontendConfig | Mapping | None = None,
    ):
        """Each group is its settings dataclass (data/settings.py) or a mapping of its fields (unknown keys are
        refused); None = its defaults. `audio` is the conf/audio group: units from the corpus (default), or
        mode=continuous (MoST-C: ASR prompts carry waveforms and frame slots, see data/continuous.py).
        The flat `data` yaml group goes through `from_settings`."""
        super().__init__()
        self.dataset = settings_from(DatasetSettings, dataset, "data.dataset")
        self.loader = settings_from(LoaderSettings, loader, "data.loader")
        self.stream = settings_from(StreamSettings, stream, "data.stream")
        self.quality = settings_from(QualitySettings, quality, "data.quality")
        self.evaluation = settings_from(EvalSettings, evaluation, "data.evaluation")
        self.audio = AudioFrontendConfig.from_any(plain(audio))
        self.recipe = self.dataset.corpus
        if not self.audio.continuous and self.audio.encoder:  # e.g. audio=hubert_units: the corpus's units
            if self.dataset.corpus_dir:
                raise ValueError("audio.encoder (units from another encoder) rebuilds the demo corpus; it cannot "
                                 f"change the units of the prepared corpus_dir {self.dataset.corpus_dir}")
            self.recipe = dataclasses.replace(self.recipe, unit_encoder=self.audio.encoder,
                                              unit_quantizer=self.audio.quantizer)
        self._demo_chat_dir: Path | None = None
        self._resume_state: dict[str, Any] | None = None
        self._consumed: dict[str, Any] = {}  # worker -> data_state of the last batch that reached a training step
        self._stream_shape: tuple[int, int] | None = None  # (world_size, num_workers) of the live training stream
        self._tokenizer: MoSTTokenizer | None = None
        self._manifest: dict[str, Any] | None = None
        self._eval_cache: dict[tuple, Any] = {}
        self._skips_reported: set[tuple] = set()  # eval record sets whose skips a loader already counted
        self.skip_ledger: list[tuple[str, str, str, str, int, str]] = []  # (split, shard, key, kind, samples, detail)
        self._audio_frames = None

    @classmethod
    def from_settings(cls, **settings: Any) -> "MoSTDataModule":
        """From the flat `data` group (conf/data/*.yaml, plus `audio`): each key goes to the group whose field it
        is (data/settings.py); an unknown key is refused, naming it. Hydra's `_target_` for conf/data."""
        return cls(**build_settings(settings))

    # ------------------------------------------------------------------ corpus
    @property
    def data_dir(self) -> str:
        return self.dataset.data_dir

    @property
    def corpus_dir(self) -> Path:
        given = self.dataset.corpus_dir
        return Path(given) if given else corpus_dir_for(self.recipe, self.data_dir)

    def prepare_data(self) -> None:
        """Build the demo corpus once (cached by recipe hash; a file lock serialises concurrent builders)."""
        if self.dataset.corpus_dir:
            load_manifest(self.corpus_dir)  # fail early with a clear message
        else:
            build_demo_corpus(self.recipe, self.data_dir, self.dataset.build_workers, self.dataset.progress)
        if uses_demo_chat(self.stream.sources):
            _ = self.demo_chat_dir

    @property
    def demo_chat_dir(self) -> Path:
        """The demo chat set for this corpus's units (built on first use, cached by recipe + unit extractor)."""
        if self._demo_chat_dir is None:
            _ = self.manifest  # the corpus (its unit extractor) first
            self._demo_chat_dir = build_demo_chat(self.dataset.demo_chat, self.data_dir,
                                                  self.corpus_dir / "unit_extractor", self.dataset.build_workers)
        return self._demo_chat_dir

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            if not (self.corpus_dir / "manifest.json").is_file():
                self.prepare_data()
            self._manifest = load_manifest(self.corpus_dir)
        return self._manifest

    @property
    def tokenizer(self) -> MoSTTokenizer:
        """The corpus tokenizer, or the base's extended one (data.tokenizer.from_base); builds the corpus first if
        needed (so the model can be sized before fit)."""
        if self._tokenizer is None:
            settings = self.dataset.tokenizer
            if settings.from_base:  # a pretrained model's vocabulary + appended unit/audio tokens
                self._tokenizer = MoSTTokenizer.from_base(settings.from_base, n_units=self.manifest["n_units"],
                                                          bos_token=settings.bos_token, eos_token=settings.eos_token)
            else:
                self._tokenizer = MoSTTokenizer.load(self.corpus_dir / self.manifest.get("tokenizer", "tokenizer"))
            if self._tokenizer.n_units != self.manifest["n_units"]:
                raise ValueError(f"tokenizer has {self._tokenizer.n_units} unit tokens but the corpus units "
                                 f"have {self.manifest['n_units']} values ({self.corpus_dir})")
        return self._tokenizer

    def shards(self, split: str) -> list[str]:
        """Absolute shard paths of a speech split ('train', 'validation', 'test') or 'text' of this corpus, or of
        shard paths / globs / a directory of any prepared corpus (python -m most_lightning.data.prepare), e.g. an
        eval test set `/data/librispeech/test-clean-*.tar` (its units must come from this corpus' unit extractor)."""
        if any(mark in split for mark in ("/", "*", "{")) or split.endswith(".tar"):
            return resolve_shards(split, root=self.corpus_dir, name=split)
        m = self.manifest
        entry = m["text"] if split == "text" else m["speech"].get(split)
        if entry is None:
            raise KeyError(f"corpus {self.corpus_dir} has no split {split!r}; it has {sorted(m['speech'])} + 'text'")
        return [str(self.corpus_dir / s["path"]) for s in entry["shards"]]

    def setup(self, stage: str | None = None) -> None:
        _ = self.tokenizer
        if stage in (None, "fit"):
            self.source_specs()  # unknown tasks or shard patterns that match nothing fail before any training

    @property
    def audio_frames(self):
        """Continuous audio: n_samples -> encoder frames (None in units mode)."""
        if self.audio.continuous and self._audio_frames is None:
            self._audio_frames = frame_counter(self.audio.encoder)
        return self._audio_frames

    def _continuous_formatter(self, fmt: TaskFormatter) -> ContinuousASRFormatter:
        return ContinuousASRFormatter(fmt, self.audio_frames, self.audio.markers)

    # ------------------------------------------------------------------ ranks
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def default_batches_per_epoch(self, world_size: int = 1) -> int:
        """About one pass of the corpus's train speech per epoch (of the text when no speech task is mixed in)."""
        w = self.stream.task_weights
        total = sum(w.values())
        speech_share = (w.get("asr", 0) + w.get("tts", 0)) / total
        if speech_share > 0:
            samples = self.manifest["speech"]["train"]["utterances"] / speech_share
        else:
            samples = self.manifest["text"]["sentences"]
        return max(1, math.ceil(samples / self.loader.batch_size / world_size))

    # ------------------------------------------------------------------ training
    def source_specs(self, sources: Mapping[str, Any] | None = None) -> list[SourceSpec]:
        """The named sources to train on: `sources`, else data.sources, else the corpus's train split mixed by
        task_weights (a `speech` source for asr/tts and a `text` source for text)."""
        config = plain(sources) if sources is not None else self.stream.sources
        if config is None:
            return corpus_sources(self.shards("train"), self.shards("text"), self.stream.task_weights)
        if uses_demo_chat(config):
            config = resolve_demo_chat(config, lambda: self.demo_chat_dir)
        return parse_sources(config, root=self.corpus_dir)

    def source_stream(self, sources: Mapping[str, Any] | None = None, mode: str | None = None,
                      rank: int | None = None, world_size: int | None = None) -> SourceMixStream:
        """The training stream over `sources` (default: source_specs()); mode 'exact' = one evaluation pass."""
        r, w = self._rank_world()
        rank, world_size = (r if rank is None else rank), (w if world_size is None else world_size)
        mode = mode or self.stream.shard_sampling
        if mode not in ("split", "resampled", "exact"):
            raise ValueError(f"shard_sampling must be 'split' or 'resampled' (or mode='exact'), got {mode!r}")
        resume, batches = None, None
        if mode != "exact":
            resume = self._stream_resume_state()  # a rebuilt loader continues after the last consumed batch
            self._stream_shape = (world_size, self.loader.num_workers)
            batches = self.stream.batches_per_epoch or (
                self.default_batches_per_epoch(world_size) if sources is None and self.stream.sources is None
                else SOURCES_BATCHES_PER_EPOCH)
        s, q, ld = self.stream, self.quality, self.loader
        return SourceMixStream(
            self.source_specs(sources), self.tokenizer, batch_size=ld.batch_size, batches_per_epoch=batches,
            mode=mode, rank=rank, world_size=world_size, seed=s.seed, shuffle_buffer=s.shuffle_buffer,
            shuffle_shards=s.shuffle_shards, few_shards=s.few_shards, batching=ld.batching, max_tokens=ld.max_tokens,
            bucket_pool=ld.bucket_pool, max_length=q.max_length, max_length_policy=q.max_length_policy,
            on_bad_sample=q.on_bad_sample, dedup_units=q.dedup_units, verify_audio=q.verify_audio,
            resume_state=resume, verify=q.verify, audio_frames=self.audio_frames, audio_markers=self.audio.markers)

    def _stream_resume_state(self) -> dict[str, Any] | None:
        """Where a rebuilt training stream starts: after the last consumed batch, else the checkpoint's position."""
        if not self.stream.resume_data_position:
            return None
        return self._position(gather=False) if self._consumed else self._resume_state

    def train_dataloader(self) -> DataLoader:
        # the stream restores its position from this DataModule's state_dict, not from the loader's
        return ResumableLoader(self.source_stream(), batch_size=None, num_workers=self.loader.num_workers,
                               pin_memory=self.loader.pin_memory, persistent_workers=self.loader.num_workers > 0)

    def exact_pass_dataloader(self, sources: Mapping[str, Any], num_workers: int | None = None) -> DataLoader:
        """Every sample of `sources` once per task, split disjointly over ranks x workers (evaluation)."""
        return DataLoader(self.source_stream(sources, mode="exact"), batch_size=None,
                          num_workers=self.loader.num_workers if num_workers is None else num_workers)

    # ------------------------------------------------------------------ data position (resume)
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning calls this for each batch right before its step: remember the stream position it carries and
        the bad inputs its stream skipped (for skipped.tsv)."""
        if isinstance(batch, dict) and "skipped_rows" in batch:
            self.skip_ledger += [("train", *row) for row in batch.pop("skipped_rows")]
        if isinstance(batch, dict) and "data_state" in batch:
            self.observe(batch)
        return batch

    def observe(self, batch: dict[str, Any]) -> None:
        """Record (and remove) the data position a training batch carries; call it per consumed batch when
        iterating without Lightning."""
        info = batch.pop("data_state")
        self._consumed[str(info["worker"])] = info["state"]

    def state_dict(self) -> dict[str, Any]:
        """Read heads of every rank's workers after the last batch that reached a training step (gathered from
        all ranks, so rank 0's checkpoint holds them all): per worker its read head in every source, its mixing
        RNG and its batch count; plus the training skips so far (skipped.tsv survives a resume)."""
        state = self._position(gather=True)
        rows = [list(r) for r in self.skip_ledger if r[0] == "train"]
        _, world_size = self._rank_world()
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        if rows:
            state["skipped"] = rows
        return state

    def _position(self, gather: bool) -> dict[str, Any]:
        if self._stream_shape is None:
            return {}
        rank, world_size = self._rank_world()
        ranks = {str(rank): dict(self._consumed)}
        if gather and world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(gathered, ranks)
            ranks = {k: v for part in gathered for k, v in part.items()}
        if self._resume_state:  # workers that have not yielded since the resume keep their restored position
            for r, workers in self._resume_state.get("ranks", {}).items():
                for w, st in workers.items():
                    ranks.setdefault(r, {}).setdefault(w, st)
        world_size, num_workers = self._stream_shape
        return {"world_size": world_size, "num_workers": max(num_workers, 1), "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rows = state_dict.pop("skipped", [])
        if rows and self._rank_world()[0] == 0:  # all ranks' rows, gathered: one copy is enough
            self.skip_ledger = [tuple(r) for r in rows] + [r for r in self.skip_ledger if r[0] != "train"]
        if state_dict and self.stream.resume_data_position:
            self._resume_state = state_dict
            self._consumed = {}

    # ------------------------------------------------------------------ evaluation data (in memory)
    def speech_records(self, split: str, limit: int | None = None) -> tuple[list[SpeechRecord], int]:
        """Decoded utterances of a split (first `limit`) and the number of bad samples skipped."""
        key = ("records", split, limit)
        if key not in self._eval_cache:
            policy = BadSamplePolicy(self.quality.on_bad_sample)
            n_units = self.tokenizer.n_units
            records = []
            for rec in iter_records(self.shards(split), lambda s: decode_speech_sample(
                    s, n_units, self.quality.dedup_units, self.quality.verify_audio,
                    keep_audio=self.audio.continuous), policy, verify=self.quality.verify):
                records.append(rec)
                if limit is not None and len(records) >= limit:
                    break
            self.skip_ledger += [(split, *row) for row in policy.take_rows()]
            self._eval_cache[key] = (records, policy.take())
        return self._eval_cache[key]

    def _records_once(self, split: str, limit: int | None) -> tuple[list[SpeechRecord], int]:
        """speech_records, with its skip count handed to the first loader only: the test loaders (ASR, mismatched
        ASR, TTS + text) read the same records in one pass, and a bad sample counts once per pass."""
        records, n_skipped = self.speech_records(split, limit)
        key = (split, limit)
        if key in self._skips_reported:
            return records, 0
        self._skips_reported.add(key)
        return records, n_skipped

    def skip_counts(self) -> dict[str, int]:
        """{kind: samples} over every bad input this DataModule's streams and eval sets skipped so far."""
        counts: dict[str, int] = {}
        for _, _, _, kind, n, _ in self.skip_ledger:
            counts[kind] = counts.get(kind, 0) + int(n)
        return dict(sorted(counts.items()))

    def write_skip_report(self, run_dir: str | Path, ledger: list | None = None) -> dict[str, float]:
        """Write <run_dir>/skipped.tsv (split, shard, key, reason, samples, detail; one row per bad sample or
        corrupt shard per pass) and return the sums for metrics.json: data/n_skipped and data/n_skipped/<kind>."""
        rows = self.skip_ledger if ledger is None else ledger
        clean = lambda v: str(v).replace("\t", " ").replace("\n", " ")  # noqa: E731
        path = Path(run_dir) / "skipped.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("split\tshard\tkey\treason\tsamples\tdetail\n"
                        + "".join("\t".join(clean(c) for c in row) + "\n" for row in rows))
        counts: dict[str, int] = {}
        for _, _, _, kind, n, _ in rows:
            counts[kind] = counts.get(kind, 0) + int(n)
        return {"data/n_skipped": float(sum(counts.values())),
                **{f"data/n_skipped/{k}": float(v) for k, v in sorted(counts.items())}}

    def _formatted(self, records, build, policy: BadSamplePolicy) -> list:
        out = []
        for rec, *args in records:
            try:
                out.append(build(rec, *args))
            except OverlongSampleError as err:
                policy.handle(OverlongSampleError(rec.key, rec.shard, err.reason))
        return out

    def teacher_forced_examples(self, split: str, tasks: Sequence[str], limit: int | None = None) -> list[Example]:
        records, n_skipped = self._records_once(split, limit)
        policy = BadSamplePolicy(self.quality.on_bad_sample)
        fmt = TaskFormatter(self.tokenizer, self.quality.max_length, self.quality.max_length_policy)
        examples: list[Example] = []
        for task in tasks:  # grouped by task: similar lengths pad less
            if task == "asr" and self.audio.continuous:
                cont = self._continuous_formatter(fmt)
                examples += self._formatted([(r,) for r in records], lambda r: cont.asr(r.audio, r.transcript, r.key),
                                            policy)
                continue
            examples += self._formatted([(r,) for r in records],
                                        lambda r, t=task: fmt.format(t, r.key, r.transcript, r.units), policy)
        self.skip_ledger += [(split, *row) for row in policy.take_rows()]
        if examples:
            examples[0].n_skipped = n_skipped + policy.take()
        return examples

    def asr_generation_examples(self, split: str = "test", mismatched: bool = False,
                                limit: int | None = None) -> list[GenerationExample]:
        records, n_skipped = self._records_once(split, limit)
        donors = mismatch_donors(records, self.stream.seed) if mismatched else list(range(len(records)))
        policy = BadSamplePolicy(self.quality.on_bad_sample)
        fmt = TaskFormatter(self.tokenizer, self.quality.max_length, self.quality.max_length_policy)
        if self.audio.continuous:
            cont = self._continuous_formatter(fmt)
            examples = self._formatted([(r, records[d].audio) for r, d in zip(records, donors)],
                                       lambda r, wave: cont.asr_generation(wave, r.transcript, r.key), policy)
        else:
            examples = self._formatted([(r, records[d].units) for r, d in zip(records, donors)],
                                       lambda r, u: fmt.asr_generation(u, r.transcript, r.key), policy)
        self.skip_ledger += [(split, *row) for row in policy.take_rows()]
        if examples:
            examples[0].n_skipped = n_skipped + policy.take()
        return examples

    # ------------------------------------------------------------------ evaluation loaders
    def teacher_forced_dataloader(self, split: str, tasks: Sequence[str] = TASKS,
                                  limit: int | None = None) -> DataLoader:
        examples = self.teacher_forced_examples(split, tasks, limit)
        return DataLoader(ListDataset(examples), batch_size=self.loader.eval_batch_size, shuffle=False,
                          num_workers=self.loader.num_workers, pin_memory=self.loader.pin_memory,
                          collate_fn=TeacherForcedCollator(self.tokenizer.pad_id, self.tokenizer.modality_of))

    def asr_generation_dataloader(self, split: str = "test", mismatched: bool = False,
                                  limit: int | None = None) -> DataLoader:
        examples = self.asr_generation_examples(split, mismatched, limit)
        return DataLoader(ListDataset(examples), batch_size=self.loader.eval_batch_size, shuffle=False,
                          num_workers=self.loader.num_workers, pin_memory=self.loader.pin_memory,
                          collate_fn=GenerationCollator(self.tokenizer.pad_id, self.tokenizer.modality_of,
                                                        mismatched))

    def val_dataloader(self) -> DataLoader:
        return self.teacher_forced_dataloader("validation", self.evaluation.val_tasks, self.evaluation.val_limit)

    def test_dataloader(self) -> list[DataLoader]:
        """[0]: ASR generation over the test split; [1]: TTS + text teacher-forced over the test split. The
        mismatched-audio baseline is asr_generation_dataloader(mismatched=True) (run.py: test_asr_mismatched)."""
        limit = self.evaluation.test_limit
        return [self.asr_generation_dataloader("test", False, limit),
                self.teacher_forced_dataloader("test", ("tts", "text"), limit)]
