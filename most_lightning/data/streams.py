"""Training stream: WebDataset shards -> records -> task mix -> teacher-forced batches, per rank and worker.

Shards are assigned explicitly (never webdataset's default node splitter, which raises with several processes):
- shard_sampling='split': rank r of R takes shards[r::R], worker w of W takes those[w::W] (disjoint), and
  cycles through them in a new seeded order each pass. With fewer shards than R x W (small text sets), every
  worker reads all shards in the same order and keeps every (R*W)-th sample instead: still disjoint;
- shard_sampling='resampled': every worker draws shards at random with replacement (any shard count works).
Both streams are endless; an epoch is a fixed number of batches per rank (`batches_per_epoch`), so every rank
yields the same number of batches and DDP cannot hang on uneven ends.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Literal, Sequence

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..text.tokenizer import MoSTTokenizer
from .batching import FixedBatcher, make_batcher
from .samples import (BadSamplePolicy, OnBadSample, OverlongSampleError, SpeechRecord, TextRecord, VerifyAudio,
                      decode_speech_sample, decode_text_sample, iter_records)
from .shard_reader import VERIFY_SHARDS, VerifyShards
from .tasks import TASKS, MaxLengthPolicy, TaskFormatter

ShardSampling = Literal["split", "resampled"]


def assign_shards(shards: Sequence[str], rank: int, world_size: int, worker: int,
                  num_workers: int) -> tuple[list[str], int, int]:
    """(shards to read, keep every `stride`-th sample, starting at `offset`) for one worker of one rank.

    Disjoint across all ranks and workers. Shard-level when there are enough shards, sample-level otherwise.
    """
    slots, slot = world_size * num_workers, rank * num_workers + worker
    if len(shards) >= slots:
        return list(shards)[rank::world_size][worker::num_workers], 1, 0
    return list(shards), slots, slot


def shuffled(items: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Streaming shuffle: keep a buffer of buffer_size items, emit a random one per new item."""
    if buffer_size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def endless_records(shards: Sequence[str], decode: Callable[[dict], Any], policy: BadSamplePolicy,
                    rng: random.Random, resampled: bool, stride: int = 1, offset: int = 0,
                    order_rng: random.Random | None = None, verify: VerifyShards = "size") -> Iterator[Any]:
    """Records from `shards` forever (seeded order); stops with an error if a full round gives nothing usable.

    stride/offset keep only samples offset, offset+stride, ... of each round; then the shard order must be the
    same in every worker, so it comes from `order_rng` (seeded identically everywhere).
    """
    shards = list(shards)
    order_rng = order_rng or rng
    while True:
        order = [rng.choice(shards) for _ in shards] if resampled else order_rng.sample(shards, len(shards))
        got = 0
        for record in iter_records(order, decode, policy, stride, offset, verify):
            got += 1
            yield record
        if got == 0:
            share = f" (this worker keeps 1 sample in {stride}: too few samples for all ranks x workers?)" \
                if stride > 1 else ""
            raise RuntimeError(f"no usable sample in {len(order)} shard read(s) of {shards[:3]}...{share}: "
                               f"{policy.total} bad sample(s) skipped; check the corpus or set on_bad_sample='raise'")


class MixedTaskStream(IterableDataset):
    """Endless mixture of ASR/TTS (from speech shards) and text LM (from text shards) batches."""

    def __init__(
        self,
        speech_shards: Sequence[str],
        text_shards: Sequence[str],
        tokenizer: MoSTTokenizer,
        batch_size: int,
        batches_per_epoch: int,
        task_weights: dict[str, float],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 500,
        shard_sampling: ShardSampling = "split",
        max_length: int | None = None,
        max_length_policy: MaxLengthPolicy = "drop",
        on_bad_sample: OnBadSample = "skip",
        dedup_units: bool = True,
        verify_audio: VerifyAudio = "header",
        audio_frames: Callable[[int], int] | None = None,
        audio_markers: str = "drop",
        batching: str = "fixed",
        max_tokens: int | None = None,
        bucket_pool: int = 256,
        verify: VerifyShards = "size",
        resume_state: dict[str, Any] | None = None,
    ):
        """audio_frames: continuous audio input (MoST-C): n_samples -> encoder frames; ASR prompts then carry
        the waveform and frame slots (data/continuous.py) instead of unit tokens. audio_markers: drop | keep.
        batching / max_tokens / bucket_pool: how examples become batches (data/batching.py); with bucket or
        pack, examples still pooled when a pass has yielded its batches_per_epoch batches are dropped (each
        pass samples the mixture afresh). verify: shard checks against their manifest (data/shard_reader.py).
        resume_state: the data position of a checkpoint (MoSTDataModule.state_dict): each worker replays its
        epoch's batches up to the saved count and yields the rest (the epoch's data depend only on seed and epoch,
        so the resumed stream is the uninterrupted one's)."""
        super().__init__()
        unknown = set(task_weights) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(unknown)} in task_weights; known: {TASKS}")
        self.tasks = [t for t in TASKS if task_weights.get(t, 0) > 0]
        if not self.tasks:
            raise ValueError(f"task_weights {task_weights} gives no task a positive weight")
        self.weights = [float(task_weights[t]) for t in self.tasks]
        if "text" in self.tasks and not text_shards:
            raise ValueError("task_weights asks for text LM but the corpus has no text shards")
        if any(t in self.tasks for t in ("asr", "tts")) and not speech_shards:
            raise ValueError("task_weights asks for ASR/TTS but the corpus has no speech shards")
        if shard_sampling not in ("split", "resampled"):
            raise ValueError(f"shard_sampling must be 'split' or 'resampled', got {shard_sampling!r}")
        BadSamplePolicy(on_bad_sample)  # validates the name
        if verify not in VERIFY_SHARDS:
            raise ValueError(f"data.verify must be one of {VERIFY_SHARDS}, got {verify!r}")
        self.verify, self.resume_state = verify, resume_state
        self.speech_shards, self.text_shards = list(speech_shards), list(text_shards)
        self.tokenizer = tokenizer
        self.batch_size, self.batches_per_epoch = int(batch_size), int(batches_per_epoch)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.shard_sampling = shuffle_buffer, shard_sampling
        self.max_length, self.max_length_policy, self.on_bad_sample = max_length, max_length_policy, on_bad_sample
        self.dedup_units, self.verify_audio = dedup_units, verify_audio
        self.audio_frames, self.audio_markers = audio_frames, audio_markers
        if batching == "pack" and audio_frames is not None:
            raise ValueError("data.batching=pack cannot hold continuous audio (audio=continuous) examples; "
                             "use batching=fixed or bucket")
        self.batching, self.max_tokens, self.bucket_pool = batching, max_tokens, bucket_pool
        self._batcher(random.Random())  # an impossible batching setting fails here, before any worker starts
        self.epoch = 0
        self._local_passes = 0  # counts passes inside a persistent worker, where set_epoch does not reach

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._local_passes = epoch, 0

    @property
    def _pass(self) -> int:
        """The epoch this pass belongs to, also in a persistent worker (its copy saw set_epoch only once)."""
        return self.epoch + self._local_passes

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _batcher(self, rng: random.Random) -> FixedBatcher:
        return make_batcher(self.batching, self.batch_size, self.max_tokens, self.bucket_pool, self.max_length, rng,
                            self.tokenizer.pad_id, self.tokenizer.modality_of)

    def _source(self, shards: list[str], decode, policy, rng, worker: int, n_workers: int,
                epoch: int) -> Iterator[Any]:
        if self.shard_sampling == "resampled":
            return shuffled(endless_records(shards, decode, policy, rng, True, verify=self.verify),
                            self.shuffle_buffer, rng)
        mine, stride, offset = assign_shards(shards, self.rank, self.world_size, worker, n_workers)
        order_rng = random.Random(f"{self.seed}/{epoch}/order") if stride > 1 else rng
        records = endless_records(mine, decode, policy, rng, False, stride, offset, order_rng, self.verify)
        return shuffled(records, self.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self._pass
        self._local_passes += 1
        # the DataLoader takes batches from its workers in turn, starting at worker 0; a run resumed mid-epoch must
        # start with the worker whose batch was next, so worker ids rotate for that epoch (logical = the data's)
        worker = (worker + self._resume_rotation(epoch, n_workers)) % n_workers
        n_batches = self.batches_per_epoch // n_workers + (worker < self.batches_per_epoch % n_workers)
        # the epoch twice: the seed string of earlier versions (epoch / pass count), so runs without workers
        # draw the same data as before
        rng = random.Random(f"{self.seed}/{epoch}/{epoch}/{self.rank}/{worker}")
        policy = BadSamplePolicy(self.on_bad_sample)
        formatter = TaskFormatter(self.tokenizer, self.max_length, self.max_length_policy)
        n_units = self.tokenizer.n_units
        continuous = None
        if self.audio_frames is not None:
            from .continuous import ContinuousASRFormatter

            continuous = ContinuousASRFormatter(formatter, self.audio_frames, self.audio_markers)

        def decode_speech(sample: dict) -> SpeechRecord:
            return decode_speech_sample(sample, n_units, self.dedup_units, self.verify_audio,
                                        keep_audio=continuous is not None and "asr" in self.tasks)

        sources: dict[str, Iterator[Any]] = {}
        if "asr" in self.tasks or "tts" in self.tasks:
            sources["speech"] = self._source(self.speech_shards, decode_speech, policy, rng, worker, n_workers, epoch)
        if "text" in self.tasks:
            sources["text"] = self._source(self.text_shards, decode_text_sample, policy, rng, worker, n_workers, epoch)
        batcher = self._batcher(random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}/batching"))
        ready: list[dict[str, Any]] = []
        replay = self._batches_to_replay(epoch, worker, n_workers)
        for done in range(1, n_batches + 1):
            while not ready:
                task = rng.choices(self.tasks, self.weights)[0]
                if task == "text":
                    rec: TextRecord = next(sources["text"])
                    text, units = rec.text, None
                else:
                    rec = next(sources["speech"])
                    text, units = rec.transcript, rec.units
                try:
                    if task == "asr" and continuous is not None:
                        ready = batcher.add(continuous.asr(rec.audio, text, rec.key))
                    else:
                        ready = batcher.add(formatter.format(task, rec.key, text, units))
                except OverlongSampleError as err:
                    policy.handle(OverlongSampleError(rec.key, rec.shard, err.reason))
            batch = ready.pop(0)
            if done <= replay:  # resumed mid-epoch: these batches reached a training step before the checkpoint
                policy.take(), policy.take_reasons(), policy.take_rows()  # their skips were counted before it
                continue
            batch["n_skipped"] += policy.take()
            batch["n_skipped_by_reason"] = policy.take_reasons()
            batch["skipped_rows"] = policy.take_rows()
            batch["data_state"] = {"rank": self.rank, "worker": worker, "state": {"epoch": epoch, "batches": done}}
            yield batch

    def _resume_rotation(self, epoch: int, n_workers: int) -> int:
        """Batches consumed in the saved epoch, modulo the workers: the worker whose batch comes next."""
        if not self.resume_state or n_workers == 1:
            return 0
        self._batches_to_replay(epoch, 0, n_workers)  # validates the saved shape
        workers = self.resume_state.get("ranks", {}).get(str(self.rank), {})
        return sum(int(st.get("batches", 0)) for st in workers.values() if st.get("epoch") == epoch) % n_workers

    def _batches_to_replay(self, epoch: int, worker: int, n_workers: int) -> int:
        """Batches of this epoch that this worker yielded before the checkpoint (0 without a saved position)."""
        if not self.resume_state:
            return 0
        saved = self.resume_state
        if saved.get("world_size") != self.world_size or saved.get("num_workers") != max(n_workers, 1):
            raise ValueError(
                f"the saved data position is for {saved.get('world_size')} rank(s) x {saved.get('num_workers')} "
                f"worker(s), this run has {self.world_size} x {n_workers}; resume with the same data.num_workers "
                "and devices, or set data.resume_data_position=false to restart the epoch's data")
        state = saved.get("ranks", {}).get(str(self.rank), {}).get(str(worker), {})
        return int(state.get("batches", 0)) if state.get("epoch") == epoch else 0


class EpochAwareLoader(DataLoader):
    """DataLoader that tells its dataset which epoch each pass is (Lightning only sets epochs on samplers).

    ``first_epoch``: the epoch of its first pass (a run resumed from a checkpoint starts at the saved epoch, so an
    epoch's data is the same as in the uninterrupted run)."""

    def __init__(self, *args, first_epoch: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._passes = first_epoch - 1

    def __iter__(self):
        self._passes += 1
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self._passes)
        return super().__iter__()


class ResumableLoader(EpochAwareLoader):
    """The loader of a SourceMixStream. Its position lives in the DataModule's state_dict (taken from the batches
    that reached a training step); these empty hooks tell Lightning the loader resumes mid-epoch by itself."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
