"""Helpers for tests: a tiny demo corpus (~30 utterances, a few seconds to build) and bad-shard makers.

    corpus_dir = build_tiny_corpus(tmp_path_factory.getbasetemp() / "most_data")   # cached per session dir
    dm = MoSTDataModule.from_settings(data_dir=..., corpus=TINY_RECIPE, batch_size=4, max_length=None)
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import webdataset as wds

from ..audio.io import encode_audio, read_audio
from .demo_corpus import DemoCorpusRecipe, build_demo_corpus

# 4 utterances per shard: 5 train shards, enough for 2 ranks x 2 workers with shard_sampling='split'.
TINY_RECIPE = DemoCorpusRecipe(n_train=20, n_val=4, n_test=6, n_text=40, n_units=32, text_vocab_size=320,
                               shard_size=4, kmeans_max_frames=20_000)


def build_tiny_corpus(data_dir: str | os.PathLike, recipe: DemoCorpusRecipe = TINY_RECIPE) -> Path:
    return build_demo_corpus(recipe, data_dir, num_workers=1, progress=False)


def read_shard(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Raw samples (member -> bytes, plus __key__) of a shard, in order."""
    return [{k: v for k, v in s.items() if k != "__url__"} for s in wds.tarfile_samples([{"url": str(path)}])]


def write_shard(path: str | os.PathLike, samples: Iterable[dict[str, Any]]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return Path(path)


def bad_variant(sample: dict[str, Any], kind: str) -> dict[str, Any]:
    """A copy of a good speech sample broken in one way: 'garbage_audio', 'missing_transcript',
    'empty_transcript', 'wrong_sample_rate', 'missing_units'."""
    s = dict(sample)
    s["__key__"] = f"{sample['__key__']}_{kind}"
    if kind == "garbage_audio":
        s["flac"] = b"fLaC this is not audio" + bytes(range(256))
    elif kind == "missing_transcript":
        del s["txt"]
    elif kind == "empty_transcript":
        s["txt"] = b"   "
    elif kind == "wrong_sample_rate":
        wave, _ = read_audio(sample["flac"], target_sample_rate=8000)
        s["flac"] = encode_audio(wave, 8000)
    elif kind == "missing_units":
        del s["units.npy"]
    else:
        raise ValueError(f"unknown bad-sample kind {kind!r}")
    return s


def units_npy(units: Iterable[int]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(list(units), dtype=np.int16), allow_pickle=False)
    return buf.getvalue()


def ddp_stream_probe(rank: int, world_size: int, init_file: str, data_dir: str, out_dir: str,
                     num_workers: int = 0) -> None:
    """Process body for a multi-process test: join a gloo group, take this rank's training stream from the
    DataModule (rank found through torch.distributed) and write the keys of one epoch to out_dir/rank{r}.json."""
    import json

    import torch.distributed as dist

    from .datamodule import MoSTDataModule

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        dm = MoSTDataModule.from_settings(data_dir=data_dir, corpus=TINY_RECIPE, batch_size=3, max_length=None,
                                          progress=False, num_workers=num_workers)
        dm.prepare_data()
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        keys = [k for b in batches for k in b["key"]]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"batches": len(batches), "keys": keys}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def chat_sample(key: str, turns: list[dict[str, Any]], source: str = "fixture", split: str = "train") -> dict[str, Any]:
    """A chat sample in the shard schema (most_lightning.data.chat). Each turn: role, text, and optionally
    `flac` (bytes) and `units` (ids) which become members turn{i}.flac / turn{i}.units.npy."""
    import json

    sample: dict[str, Any] = {"__key__": key}
    messages = []
    for i, t in enumerate(turns):
        m = {"role": t["role"], "text": t["text"], "audio": None, "units": None}
        if t.get("flac") is not None:
            m["audio"] = f"turn{i}.flac"
            sample[m["audio"]] = t["flac"]
        if t.get("units") is not None:
            m["units"] = f"turn{i}.units.npy"
            sample[m["units"]] = units_npy(t["units"])
        messages.append(m)
    sample["messages.json"] = json.dumps(messages).encode()
    sample["json"] = json.dumps({"source": source, "split": split, "n_turns": len(turns)}).encode()
    return sample


def write_chat_shards(out_dir: str | os.PathLike, speech_shards: Iterable[str], per_shard: int = 4,
                      limit: int | None = None) -> list[Path]:
    """A small chat set voiced with demo utterances: per utterance one dialogue whose user turn is the
    utterance (its flac + units) and whose assistant repeats the sentence; every third one has a system
    turn and a second, text-only exchange (multi-turn)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = []
    for shard in speech_shards:
        for s in read_shard(shard):
            utt_units = np.load(io.BytesIO(s["units.npy"]), allow_pickle=False).tolist()
            text = s["txt"].decode()
            i = len(samples)
            turns = [{"role": "user", "text": f"repeat after me: {text}", "flac": s["flac"], "units": utt_units},
                     {"role": "assistant", "text": text}]
            if i % 3 == 0:
                turns = [{"role": "system", "text": "you are a helpful assistant"}, *turns,
                         {"role": "user", "text": "how many words was that"},
                         {"role": "assistant", "text": f"{len(text.split())} words"}]
            samples.append(chat_sample(f"chat_{i:06d}", turns))
            if limit is not None and len(samples) >= limit:
                break
    paths = []
    for j in range(0, len(samples), per_shard):
        paths.append(write_shard(out / f"chat-{j // per_shard:05d}.tar", samples[j:j + per_shard]))
    return paths


def ddp_sources_probe(rank: int, world_size: int, init_file: str, data_dir: str, out_dir: str,
                      runs: dict, num_workers: int = 2) -> None:
    """Process body for the multi-process pipeline tests: join a gloo group (60 s timeout, so a desynchronised
    rank fails instead of hanging); for each run name -> (sources, mode) stream the sources with the DataModule
    ('exact' pass, or the 'resampled'/'split' training stream with one all-reduce per batch like a DDP step) and
    write the keys to out_dir/<name>_rank{r}.json."""
    import datetime
    import json

    import torch
    import torch.distributed as dist

    from .datamodule import MoSTDataModule

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name, (sources, mode) in runs.items():
            dm = MoSTDataModule.from_settings(data_dir=data_dir, corpus=TINY_RECIPE, batch_size=3, max_length=None,
                                              progress=False, num_workers=num_workers, verify_audio="none",
                                              sources=sources, shard_sampling="resampled" if mode == "exact" else mode,
                                              batches_per_epoch=7, shuffle_buffer=5)
            loader = dm.exact_pass_dataloader(sources) if mode == "exact" else dm.train_dataloader()
            keys, n_batches = [], 0
            for batch in loader:
                keys += batch["key"]
                n_batches += 1
                if mode != "exact":
                    dm.observe(batch)
                    dist.all_reduce(torch.ones(1))  # a rank with fewer batches would leave the other one hanging
            state = dm.state_dict() if mode != "exact" else {}  # gathers every rank's position (a collective)
            Path(out_dir, f"{name}_rank{rank}.json").write_text(json.dumps(
                {"batches": n_batches, "keys": keys, "state_ranks": sorted(state.get("ranks", {}))}))
            dist.barrier()
    finally:
        dist.destroy_process_group()


class BatchKeyRecorder:
    """Lightning callback for resume tests: appends one JSON line per training step to `path`: the global step
    after the step and the keys of its batch. Flushed at once, so a process killed at any step leaves whole lines.
    (Built lazily as a Callback subclass so that this module does not import Lightning.)"""

    def __new__(cls, path: str):
        from lightning.pytorch import Callback

        class _Recorder(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                import json

                with open(path, "a") as f:
                    f.write(json.dumps({"step": trainer.global_step, "keys": list(batch.get("key", []))}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())

        return _Recorder()
