"""The general training/evaluation stream: named sources -> records -> task mix -> token-budget batches.

Who reads what (explicit node and worker splitting; never webdataset's default splitter):
    slot = rank * num_workers + worker, slots = world_size * num_workers
    enough shards (>= slots): the slot reads shards[rank::world_size][worker::num_workers]      (disjoint shards)
    fewer shards: few_shards='stride' (default) -> every slot reads all shards in the same order (a seeded
                  permutation per pass, also in resampled mode) and keeps raw samples slot, slot + slots, ...
                  (disjoint samples; a slot that gets none raises, never hangs); few_shards='error' -> a
                  TooFewShardsError naming the source and the counts.
Modes:
    'resampled'  endless; each pass draws len(own shards) shards WITH replacement (seeded), so uneven shard sizes
                 cannot desynchronise ranks: every worker yields exactly its share of `batches_per_epoch`.
    'split'      endless; each pass reads every own shard once in a new seeded order (shuffle_shards).
    'exact'      one pass for evaluation: every (source, task) pair formats every own sample once, in shard order;
                 the union over all ranks x workers is the whole split, without repeats. Ranks may end with
                 different batch counts (fine for Lightning's eval loops, which do not sync per step).
Shuffling: each source's records are shuffled in blocks of `shuffle_buffer` (BlockShuffle).
Resume: every batch carries `data_state` = per source the read head where its current shuffle block began (pass,
shard, sample, index), the block number and how many of the block were handed out; the mixing RNG state; and the
batch count. Restarting from a state re-reads the current blocks and passes over what was handed out, so with
batching=fixed the resumed stream is exactly the uninterrupted one; bucket and pack start with an empty pool, so
the examples that waited in it (< bucket_pool, or one packed row) are skipped, per worker.
Continuous audio input (MoST-C, `audio_frames`): ASR examples carry the waveform and frame slots
(data/continuous.py) instead of unit tokens; the other tasks are unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Literal, get_args

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..text.tokenizer import MoSTTokenizer
from .batching import make_batcher
from .chat import decode_chat_sample
from .samples import (BadSampleError, BadSamplePolicy, OnBadSample, OverlongSampleError, VerifyAudio,
                      decode_speech_sample, decode_text_sample, iter_shard)
from .shard_reader import VERIFY_SHARDS, VerifyShards
from .sources import SourceSpec
from .tasks import MaxLengthPolicy, TaskFormatter

ShardSampling = Literal["split", "resampled"]  # the training stream's modes (data.shard_sampling)
StreamMode = Literal[ShardSampling, "exact"]  # exact: one ordered pass (evaluation)
FewShards = Literal["stride", "error"]
FRESH = {"pass": 0, "shard": 0, "sample": 0, "index": 0}
RESUME_MARKER = "resume_marker"  # an item that only aligns the workers' turns on resume (dropped by the loader)


class TooFewShardsError(ValueError):
    pass


class BlockShuffle:
    """One source's records, shuffled in blocks: read `size` records, hand them out in a seeded random order,
    repeat. Its state (the read head where the current block began, the block number and how many of the block
    were handed out) restores it exactly: the block is read again and the records already handed out are passed
    over, so a resumed stream is the uninterrupted one (at the cost of re-reading at most one block)."""

    def __init__(self, cursor: "ShardCursor", records: Iterator[Any], size: int, tag: str,
                 state: Mapping[str, Any] | None = None):
        self.cursor, self.records, self.size, self.tag = cursor, records, max(1, int(size)), tag
        self.block_no, self.taken, self.block_start = 0, 0, dict(cursor.position)
        self.block: list[Any] | None = None
        if state and "block" in state:  # resumed: refill the block in progress (its skips were counted before)
            self.block_no = int(state["block"])
            self._fill()
            self.taken = int(state["taken"])

    def _fill(self) -> None:
        self.block_start = dict(self.cursor.position)
        self.block = [next(self.records) for _ in range(self.size)]
        random.Random(f"{self.tag}/{self.block_no}").shuffle(self.block)

    def __iter__(self) -> "BlockShuffle":
        return self

    def __next__(self) -> Any:
        if self.block is None or self.taken >= len(self.block):
            if self.block is not None:
                self.block_no, self.taken = self.block_no + 1, 0
            self._fill()
        self.taken += 1
        return self.block[self.taken - 1]

    def state(self) -> dict[str, Any]:
        return {**self.block_start, "block": self.block_no, "taken": self.taken}


class ShardCursor:
    """One worker slot's raw samples of one source, with a read head that can be saved and restored."""

    def __init__(self, source: SourceSpec, mode: StreamMode, seed: int, rank: int, world_size: int, worker: int,
                 num_workers: int, few_shards: FewShards = "stride", shuffle_shards: bool = True,
                 position: Mapping[str, int] | None = None, verify: VerifyShards = "size"):
        shards, slots, slot = list(source.shards), world_size * num_workers, rank * num_workers + worker
        if len(shards) >= slots:
            self.mine, self.stride, self.offset = shards[rank::world_size][worker::num_workers], 1, 0
            order_seed = f"{seed}/{source.name}/{rank}/{worker}"
        elif few_shards == "error":
            raise TooFewShardsError(
                f"data source {source.name!r} has {len(shards)} shard(s) for {world_size} rank(s) x {num_workers} "
                f"worker(s) = {slots} readers; re-shard it into >= {slots} shards, lower data.num_workers, or set "
                "data.few_shards=stride (every reader scans all shards and keeps every {slots}-th sample)")
        else:  # every slot scans the same shard order and keeps its own samples: the order must not depend on it
            self.mine, self.stride, self.offset = shards, slots, slot
            order_seed = f"{seed}/{source.name}"
        self.source, self.mode, self.shuffle_shards, self.order_seed = source, mode, shuffle_shards, order_seed
        self.position = dict(position or FRESH)
        self.verify = verify

    def order(self, n_pass: int) -> list[str]:
        if self.mode == "exact" or (self.mode == "split" and not self.shuffle_shards):
            return list(self.mine)
        rng = random.Random(f"{self.order_seed}/{n_pass}")
        # striding readers share one order; drawing it with replacement would hand a shard read twice to two
        # readers at different offsets, so they get a permutation (a new one each pass) in resampled mode too
        if self.mode == "resampled" and self.stride == 1:
            return [rng.choice(self.mine) for _ in self.mine]
        return rng.sample(self.mine, len(self.mine))

    def samples(self, policy: BadSamplePolicy) -> Iterator[dict]:
        """Raw samples from the read head on; the head moves past a sample before it is handed out."""
        pos = self.position
        while True:
            from_start, kept = pos["shard"] == 0 and pos["sample"] == 0, 0
            order = self.order(pos["pass"])
            while pos["shard"] < len(order):
                skip, base = pos["sample"], pos["index"] - pos["sample"]
                owns = lambda i, b=base: (b + i) % self.stride == self.offset  # noqa: E731 (lost samples' reader)
                reader, i = iter_shard(order[pos["shard"]], policy, self.verify, owns), -1
                while True:
                    # set before every read: other sources' readers interleave with this one on the same policy
                    policy.current_pass = (self.source.name, pos["pass"])
                    sample = next(reader, None)
                    if sample is None:
                        break
                    i += 1
                    if i < skip:
                        continue  # resumed inside this shard: these were read before the checkpoint
                    index = pos["index"]
                    pos["sample"], pos["index"] = i + 1, index + 1
                    if index % self.stride == self.offset:
                        kept += 1
                        yield sample
                pos["shard"], pos["sample"] = pos["shard"] + 1, 0
            pos.update(FRESH, **{"pass": pos["pass"] + 1})
            if self.mode == "exact":
                return
            if from_start and kept == 0:
                share = f" (this reader keeps 1 raw sample in {self.stride})" if self.stride > 1 else ""
                raise RuntimeError(
                    f"data source {self.source.name!r}: a full pass over {len(order)} shard read(s) "
                    f"({self.mine[:2]}...) gave no sample{share}: {policy.total} bad sample(s)/shard(s) skipped. "
                    "Check the shards, add shards, or use fewer ranks x workers")


def rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: Sequence) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


class SourceMixStream(IterableDataset):
    """Batches from a weighted mix of (source, task) pairs; see the module docstring for splitting and resume."""

    def __init__(
        self,
        sources: Sequence[SourceSpec],
        tokenizer: MoSTTokenizer,
        batch_size: int = 16,
        batches_per_epoch: int | None = None,
        mode: StreamMode = "resampled",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 500,
        shuffle_shards: bool = True,
        few_shards: FewShards = "stride",
        batching: str = "fixed",
        max_tokens: int | None = None,
        bucket_pool: int = 256,
        max_length: int | None = None,
        max_length_policy: MaxLengthPolicy = "drop",
        on_bad_sample: OnBadSample = "skip",
        dedup_units: bool = True,
        verify_audio: VerifyAudio = "header",
        resume_state: Mapping[str, Any] | None = None,
        verify: VerifyShards = "size",
        audio_frames: Callable[[int], int] | None = None,
        audio_markers: str = "drop",
    ):
        """audio_frames: continuous audio input (MoST-C): n_samples -> encoder frames; ASR prompts then carry the
        waveform and frame slots (data/continuous.py). audio_markers: drop | keep the audio markers around them."""
        super().__init__()
        if mode not in get_args(StreamMode):
            raise ValueError(f"stream mode must be one of {get_args(StreamMode)}, got {mode!r}")
        if mode != "exact" and not batches_per_epoch:
            raise ValueError(f"mode {mode!r} is endless: give batches_per_epoch (batches per rank per epoch)")
        if few_shards not in ("stride", "error"):
            raise ValueError(f"few_shards must be 'stride' or 'error', got {few_shards!r}")
        BadSamplePolicy(on_bad_sample)
        if verify not in VERIFY_SHARDS:
            raise ValueError(f"data.verify must be one of {VERIFY_SHARDS}, got {verify!r}")
        self.verify = verify
        self.sources, self.tokenizer = list(sources), tokenizer
        self.pairs = [(s, task, w) for s in self.sources for task, w in s.tasks]
        self.batch_size, self.batches_per_epoch, self.mode = int(batch_size), batches_per_epoch, mode
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.shuffle_shards, self.few_shards = int(shuffle_buffer), shuffle_shards, few_shards
        self.batching, self.max_tokens, self.bucket_pool = batching, max_tokens, bucket_pool
        self.max_length, self.max_length_policy, self.on_bad_sample = max_length, max_length_policy, on_bad_sample
        if batching == "pack" and audio_frames is not None:
            raise ValueError("data.batching=pack cannot hold continuous audio (audio=continuous) examples; "
                             "use batching=fixed or bucket")
        self.audio_frames, self.audio_markers = audio_frames, audio_markers
        self._batcher(random.Random(0))  # validates the batching settings
        self.dedup_units, self.verify_audio = dedup_units, verify_audio
        self.resume_state = resume_state
        self._live: Iterator[dict] | None = None  # the endless batch generator of this worker (kept across epochs)

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an exact-pass stream has no length known in advance")
        return self.batches_per_epoch

    def _batcher(self, rng: random.Random):
        return make_batcher(self.batching, self.batch_size, self.max_tokens, self.bucket_pool, self.max_length, rng,
                            self.tokenizer.pad_id, self.tokenizer.modality_of)

    # ------------------------------------------------------------------ records
    def _decoder(self, source: SourceSpec):
        n_units, kind = self.tokenizer.n_units, source.kind
        if kind == "speech":
            keep_audio = self.audio_frames is not None and any(task == "asr" for task, _ in source.tasks)
            return lambda s: decode_speech_sample(s, n_units, self.dedup_units, self.verify_audio,
                                                  keep_audio=keep_audio)
        if kind == "chat":
            return lambda s: decode_chat_sample(s, n_units, self.dedup_units, self.verify_audio)
        return decode_text_sample

    def _records(self, cursor: ShardCursor, policy: BadSamplePolicy) -> Iterator[Any]:
        decode = self._decoder(cursor.source)
        for sample in cursor.samples(policy):
            try:
                yield decode(sample)
            except BadSampleError as error:
                policy.handle(error)

    def _formatter(self) -> TaskFormatter:
        return TaskFormatter(self.tokenizer, self.max_length, self.max_length_policy)

    def _format(self, formatter: TaskFormatter, task: str, record: Any):
        if task == "asr" and self.audio_frames is not None:
            from .continuous import ContinuousASRFormatter

            return ContinuousASRFormatter(formatter, self.audio_frames, self.audio_markers).asr(
                record.audio, record.transcript, record.key)
        if task in ("text_chat", "speech_chat"):
            return formatter.chat(record, speech=task == "speech_chat")
        if task == "text":
            return formatter.text_lm(record.text, record.key)
        return formatter.format(task, record.key, record.transcript, record.units)

    # ------------------------------------------------------------------ iteration
    def _worker_state(self, worker: int, n_workers: int) -> dict | None:
        if not self.resume_state:
            return None
        if self.resume_state.get("world_size") != self.world_size or self.resume_state.get("num_workers") != n_workers:
            raise ValueError(
                f"the saved data position is for {self.resume_state.get('world_size')} rank(s) x "
                f"{self.resume_state.get('num_workers')} worker(s), this run has {self.world_size} x {n_workers}; "
                "resume with the same data.num_workers and devices, or set data.resume_data_position=false to "
                "restart the data stream (samples may then repeat)")
        state = self.resume_state.get("ranks", {}).get(str(self.rank), {}).get(str(worker))
        if state and "sources" not in state:  # {epoch, batches}: written by the per-epoch demo stream, now removed
            raise ValueError(f"the saved data position {state} is the old demo stream's, which this stream cannot "
                             "continue; set data.resume_data_position=false to restart the data stream")
        return state

    def _batches_done_on_rank(self) -> int:
        workers = (self.resume_state or {}).get("ranks", {}).get(str(self.rank), {})
        return sum(int(st.get("batches", 0)) for st in workers.values())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.mode == "exact":
            yield from self._exact_pass(worker, n_workers)
            return
        epoch = self.batches_per_epoch
        n_batches = epoch // n_workers + (worker < epoch % n_workers)
        if self._live is None:  # first epoch in this process (later epochs continue the same stream)
            self._live = self._endless(worker, n_workers, self._worker_state(worker, n_workers))
            # resumed mid-epoch: this epoch has only its remaining batches (what Lightning's loop expects). The
            # DataLoader takes one batch from each worker in turn starting at worker 0, but the uninterrupted run's
            # next batch is worker consumed % n_workers's: the workers before it hand out one marker first, which
            # ResumableLoader drops, so the batches come in the uninterrupted order.
            consumed = self._batches_done_on_rank() % epoch
            n_batches -= consumed // n_workers + (worker < consumed % n_workers)
            if worker < consumed % n_workers:
                yield {RESUME_MARKER: True}
        for _ in range(n_batches):
            yield next(self._live)

    def _endless(self, worker: int, n_workers: int, state: Mapping | None) -> Iterator[dict[str, Any]]:
        state = state or {}
        done = int(state.get("batches", 0))
        tag = f"{self.seed}/{self.rank}/{worker}"
        policy = BadSamplePolicy(self.on_bad_sample)
        formatter = self._formatter()
        streams = {}
        for s in self.sources:
            saved = state.get("sources", {}).get(s.name)
            head = {k: saved[k] for k in FRESH} if saved else None
            cursor = ShardCursor(s, self.mode, self.seed, self.rank, self.world_size, worker, n_workers,
                                 self.few_shards, self.shuffle_shards, head, self.verify)
            streams[s.name] = BlockShuffle(cursor, self._records(cursor, policy), self.shuffle_buffer,
                                           f"{tag}/{s.name}/shuffle", saved)
        if state:  # the blocks read again on resume were counted before the checkpoint
            policy.take(), policy.take_reasons(), policy.take_rows()
        mixer = random.Random(f"{self.seed}/mix/{self.rank}/{worker}")
        if "mixer" in state:
            set_rng_state(mixer, state["mixer"])
        batcher = self._batcher(random.Random(f"{tag}/{done}/batching"))  # a resumed pool starts empty
        weights = [w for _, _, w in self.pairs]
        while True:
            source, task, _ = mixer.choices(self.pairs, weights)[0]
            record = next(streams[source.name])
            try:
                ready = batcher.add(self._format(formatter, task, record))
            except OverlongSampleError as err:
                policy.handle(OverlongSampleError(err.key, record.shard, err.reason))
                continue
            except BadSampleError as err:  # e.g. speech_chat on a dialogue without voiced turns
                policy.handle(err)
                continue
            for batch in ready:
                done += 1
                yield self._finish(batch, policy, formatter, {
                    "batches": done, "mixer": rng_state(mixer),
                    "sources": {name: stream.state() for name, stream in streams.items()}}, worker)

    def _exact_pass(self, worker: int, n_workers: int) -> Iterator[dict[str, Any]]:
        policy = BadSamplePolicy(self.on_bad_sample)
        formatter = self._formatter()
        batcher = self._batcher(random.Random(f"{self.seed}/{self.rank}/{worker}/batching"))
        # each batch waits for the next, so the last one also carries what the end of the pass reports (a shard
        # that turns out short when its end is reached)
        held: dict[str, Any] | None = None
        for source, task, _ in self.pairs:
            cursor = ShardCursor(source, "exact", self.seed, self.rank, self.world_size, worker, n_workers,
                                 self.few_shards, False, verify=self.verify)
            for record in self._records(cursor, policy):
                try:
                    ready = batcher.add(self._format(formatter, task, record))
                except BadSampleError as err:
                    policy.handle(err if err.shard != "?" else type(err)(err.key, record.shard, err.reason))
                    continue
                for batch in ready:
                    if held is not None:
                        yield self._finish(held, policy, formatter, None, worker)
                    held = batch
        for batch in batcher.flush():
            if held is not None:
                yield self._finish(held, policy, formatter, None, worker)
            held = batch
        if held is not None:
            yield self._finish(held, policy, formatter, None, worker)
        elif policy.total:  # no batch to carry the counts: say it here rather than lose them
            raise RuntimeError(f"the exact pass over {[s.name for s in self.sources]} gave no usable sample on "
                               f"rank {self.rank} worker {worker}: {policy.total} bad sample(s) skipped "
                               f"({policy.total_reasons}); check the shards")

    def _finish(self, batch: dict[str, Any], policy: BadSamplePolicy, formatter: TaskFormatter,
                state: dict | None, worker: int) -> dict[str, Any]:
        batch["n_skipped"] += policy.take()
        batch["n_skipped_by_reason"] = policy.take_reasons()
        batch["skipped_rows"] = policy.take_rows()
        if state is not None:
            batch["data_state"] = {"rank": self.rank, "worker": worker, "state": state}
        return batch


class ResumableLoader(DataLoader):
    """The training loader. Its position lives in the DataModule's state_dict (taken from the batches that reached a
    training step); these empty hooks tell Lightning the loader resumes mid-epoch by itself. It drops the markers
    that align the workers' turns after a resume (SourceMixStream.__iter__)."""

    def __iter__(self):
        return (b for b in super().__iter__() if not (isinstance(b, dict) and RESUME_MARKER in b))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
