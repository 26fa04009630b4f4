"""Helpers for tests: a tiny demo corpus (~30 utterances, a few seconds to build) and bad-shard makers.

    corpus_dir = build_tiny_corpus(tmp_path_factory.getbasetemp() / "most_data")   # cached per session dir
    dm = MoSTDataModule(data_dir=..., corpus=TINY_RECIPE, batch_size=4, max_length=None)
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
        dm = MoSTDataModule(data_dir=data_dir, corpus=TINY_RECIPE, batch_size=3, max_length=None, progress=False,
                            num_workers=num_workers)
        dm.prepare_data()
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        keys = [k for b in batches for k in b["key"]]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"batches": len(batches), "keys": keys}))
        dist.barrier()
    finally:
        dist.destroy_process_group()
