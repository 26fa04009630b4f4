"""Demo corpus: real English sentences (WordNet examples) spoken by flite, as WebDataset shards with units.

    dir = build_demo_corpus(DemoCorpusRecipe(n_train=1000), data_dir="data")    # cached by recipe hash
    python -m most_lightning.data.demo_corpus --n-train 20000 --data-dir data    # same, from the shell

Layout of `<data_dir>/demo/<recipe-hash>/`:
    speech/{train,validation,test}-NNNNN.tar   flac + txt + json + units.npy per utterance
    text/text-NNNNN.tar                        txt + json: other sentences, for text LM
    tokenizer/                                 MoSTTokenizer trained on the train + text sentences
    unit_extractor/                            MFCC encoder settings + k-means centroids fitted on train audio
    manifest.json                              recipe, counts, hours, shard checksums (written last)

Splits are by sentence: a sentence (by normalised transcript) lives in exactly one of train/validation/test/text.
Test and validation sentences are drawn first, so growing n_train or n_text keeps them fixed. The build is
resumable: synthesised shards are kept in `.work/` until the manifest is written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds

from ..audio.features import MFCCConfig
from ..audio.io import TARGET_SAMPLE_RATE, audio_info, encode_audio, read_audio
from ..audio.phone_classifier import PhoneClassifierQuantizer
from ..audio.quality import frame_phones, phone_error_rate, utterance_pnmi
from ..audio.quantizer import KMeansQuantizer
from ..audio.units import UnitExtractor, sample_frames
from ..text.tokenizer import MoSTTokenizer
from .flite import Utterance, check_voices, flite_binary, synthesize
from .text_sources import WORDNET_DIR, normalize_transcript, wordnet_sentences

log = logging.getLogger(__name__)

CORPUS_VERSION = 1  # bump when the build's output changes for the same recipe
MANIFEST = "manifest.json"
SPEECH_SPLITS = ("train", "validation", "test")
FEATS_MEMBER = "feats.npy"
UNIT_MODELS = ("kmeans", "phone_classifier")
# frames of context either side, MLP width, passes over the train frames, Viterbi cost per phone change
# (docs/audio_frontends.md; experiments/phone_frontend_study.py: the switch penalty removes boundary flicker,
# 12.2% -> 9.8% phone error rate at 25 Hz and 11.5% -> 4.9% at 50 Hz)
PHONE_CLASSIFIER_DEFAULTS: dict[str, Any] = {"context": 5, "hidden": 512, "epochs": 6, "switch_penalty": 3.0}


@dataclass
class DemoCorpusRecipe:
    """Everything that determines the corpus content; its hash names the cache directory."""

    n_train: int = 1000  # sentences per split (x voices_per_sentence utterances)
    n_val: int = 100
    n_test: int = 100
    n_text: int = 2000  # text-only sentences for text LM (disjoint from all speech sentences)
    voices: Sequence[str] = ("slt", "rms", "awb", "kal16")  # flite voices that speak at 16 kHz
    voices_per_sentence: int = 1
    seed: int = 0
    min_words: int = 3
    max_words: int = 20
    duration_stretch: Sequence[float] = (0.85, 1.15)  # uniform range of flite's duration_stretch
    f0_scale: Sequence[float] = (0.85, 1.2)  # uniform range scaling each voice's mean F0
    n_units: int = 500
    mfcc: dict[str, Any] = field(default_factory=dict)  # MFCCConfig overrides
    # another unit encoder instead of MFCC (a FeatureEncoder config, e.g. {kind: hubert, checkpoint, layer});
    # empty = MFCC. unit_quantizer: its k-means centroid file; None = fit k-means on the train audio.
    unit_encoder: dict[str, Any] = field(default_factory=dict)
    unit_quantizer: str | None = None
    # kmeans: k-means over the encoder's frames (n_units clusters); phone_classifier: a frame classifier fitted on
    # flite's phone alignments of the train audio (one unit per phone, ids < n_units; audio/phone_classifier.py)
    unit_model: str = "kmeans"
    phone_classifier: dict[str, Any] = field(default_factory=dict)  # PhoneClassifierQuantizer.fit overrides
    # reuse the unit extractor of another demo corpus (built once and cached like any corpus) instead of fitting
    # one on this corpus's train audio: DemoCorpusRecipe fields of that "front-end corpus", e.g. {n_train: 3000,
    # min_words: 11, max_words: 20}; the unit settings (unit_model, n_units, mfcc, ...) are this recipe's. Its
    # sentences must not include this corpus's test or validation sentences (checked at build time).
    unit_extractor_from: dict[str, Any] = field(default_factory=dict)
    kmeans_max_frames: int = 200_000  # frames sampled from train audio to fit k-means
    text_vocab_size: int = 2000  # BPE vocabulary (BOS/EOS included) before the audio tokens
    shard_size: int = 250  # utterances per speech shard (and 4x that many sentences per text shard)
    wordnet_dir: str = WORDNET_DIR
    version: int = CORPUS_VERSION

    def __post_init__(self):
        # Hydra hands lists/dicts over as ListConfig/DictConfig: normalise to plain, hashable-stable values.
        self.voices = tuple(str(v) for v in self.voices)
        self.duration_stretch = tuple(float(x) for x in self.duration_stretch)
        self.f0_scale = tuple(float(x) for x in self.f0_scale)
        self.mfcc = {str(k): v for k, v in dict(self.mfcc).items()}
        MFCCConfig(**self.mfcc)  # validate early
        self.unit_encoder = {str(k): v for k, v in dict(self.unit_encoder or {}).items()}
        if self.unit_model not in UNIT_MODELS:
            raise ValueError(f"DemoCorpusRecipe.unit_model must be one of {UNIT_MODELS}, got {self.unit_model!r}")
        self.phone_classifier = {str(k): v for k, v in dict(self.phone_classifier or {}).items()}
        unknown = set(self.phone_classifier) - set(PHONE_CLASSIFIER_DEFAULTS)
        if unknown:
            raise ValueError(f"DemoCorpusRecipe.phone_classifier: unknown settings {sorted(unknown)} (known: "
                             f"{sorted(PHONE_CLASSIFIER_DEFAULTS)})")
        if self.unit_model == "phone_classifier" and self.unit_quantizer is not None:
            raise ValueError("DemoCorpusRecipe.unit_quantizer (a k-means file) cannot be used with "
                             "unit_model=phone_classifier, which is fitted on the train audio")
        self.unit_extractor_from = {str(k): v for k, v in dict(self.unit_extractor_from or {}).items()}
        if self.unit_extractor_from:
            if self.unit_quantizer is not None:
                raise ValueError("DemoCorpusRecipe.unit_extractor_from and unit_quantizer both give the units: "
                                 "set one of them")
            self.front_end_recipe()  # validate the fields now, not at build time
        if self.unit_quantizer is not None and not self.unit_encoder:
            raise ValueError("DemoCorpusRecipe.unit_quantizer needs unit_encoder (the MFCC k-means is always fitted)")
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoCorpusRecipe.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_text < 0:
            raise ValueError(f"DemoCorpusRecipe.n_text must be >= 0, got {self.n_text}")
        if not self.voices or not 1 <= self.voices_per_sentence <= len(self.voices):
            raise ValueError(f"voices_per_sentence must be in [1, {len(self.voices)}] (number of voices), "
                             f"got {self.voices_per_sentence}")
        if len(self.duration_stretch) != 2 or len(self.f0_scale) != 2:
            raise ValueError("duration_stretch and f0_scale are (low, high) ranges")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")

    @classmethod
    def from_any(cls, value: "DemoCorpusRecipe | dict | None") -> "DemoCorpusRecipe":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        return cls(**{str(k): v for k, v in dict(value).items() if k != "_target_"})

    def front_end_recipe(self) -> "DemoCorpusRecipe | None":
        """The recipe of the corpus whose unit extractor this one reuses (unit_extractor_from), or None."""
        if not self.unit_extractor_from:
            return None
        keys = set(self.unit_extractor_from)
        settable = {f.name for f in dataclasses.fields(self)} - set(FRONT_END_FIELDS) - {"unit_extractor_from"}
        if keys - settable:
            raise ValueError(f"DemoCorpusRecipe.unit_extractor_from: unknown or not settable fields "
                             f"{sorted(keys - settable)} (the unit settings {list(FRONT_END_FIELDS)} are this "
                             "recipe's)")
        own = {name: getattr(self, name) for name in FRONT_END_FIELDS}
        return DemoCorpusRecipe(**{**own, **self.unit_extractor_from})

    def phone_classifier_settings(self) -> dict[str, Any]:
        return {**PHONE_CLASSIFIER_DEFAULTS, **self.phone_classifier}

    def mfcc_config(self) -> MFCCConfig:
        return MFCCConfig(**self.mfcc)

    def encoder_config(self) -> dict[str, Any]:
        """The unit encoder's config for audio.features.build_encoder."""
        return dict(self.unit_encoder) if self.unit_encoder else {"kind": "mfcc", **self.mfcc}

    def canonical(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["voices"], d["duration_stretch"], d["f0_scale"] = list(self.voices), list(self.duration_stretch), list(
            self.f0_scale)
        d["mfcc"] = dataclasses.asdict(self.mfcc_config())  # defaults count: changing them changes the corpus
        d.pop("wordnet_dir")  # where the text lives does not change the corpus
        for key in ("unit_encoder", "unit_quantizer", "unit_extractor_from"):  # absent when unused: old hashes stay
            if not d[key]:
                d.pop(key)
        if d["unit_model"] == "kmeans":  # the same for corpora built before the field existed
            d.pop("unit_model")
            d.pop("phone_classifier")
        else:  # its settings decide the units: defaults count
            d["phone_classifier"] = self.phone_classifier_settings()
        return d

    def hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# the fields that decide how audio becomes units: a front-end corpus (unit_extractor_from) takes them from the corpus
# that reuses its extractor, so the two always agree
FRONT_END_FIELDS = ("voices", "duration_stretch", "f0_scale", "n_units", "mfcc", "unit_encoder", "unit_model",
                    "phone_classifier", "kmeans_max_frames", "wordnet_dir")


def corpus_dir_for(recipe: DemoCorpusRecipe, data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "demo" / recipe.hash()


def load_manifest(corpus_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the corpus was not built (or its build did not finish); "
                                "build it with most_lightning.data.demo_corpus.build_demo_corpus or its CLI")
    return json.loads(path.read_text())


def is_built(recipe: DemoCorpusRecipe, data_dir: str | os.PathLike) -> bool:
    path = corpus_dir_for(recipe, data_dir) / MANIFEST
    return path.is_file() and json.loads(path.read_text()).get("recipe") == recipe.canonical()


# ================================================================================================ planning
def select_sentences(recipe: DemoCorpusRecipe) -> dict[str, list[str]]:
    """Disjoint sentence lists per split, drawn in a fixed order (test, validation, train, text) by seed."""
    sentences = wordnet_sentences(recipe.wordnet_dir, recipe.min_words, recipe.max_words)
    need = {"test": recipe.n_test, "validation": recipe.n_val, "train": recipe.n_train, "text": recipe.n_text}
    if sum(need.values()) > len(sentences):
        raise ValueError(f"the recipe asks for {sum(need.values())} sentences ({need}) but WordNet has only "
                         f"{len(sentences)} usable ones with {recipe.min_words}-{recipe.max_words} words; "
                         "lower n_text or n_train, or widen min_words/max_words")
    random.Random(recipe.seed).shuffle(sentences)
    out, start = {}, 0
    for split, n in need.items():
        out[split] = sentences[start : start + n]
        start += n
    return out


def plan_utterances(recipe: DemoCorpusRecipe, split: str, sentences: list[str]) -> list[Utterance]:
    rng = random.Random(f"{recipe.seed}/{split}")
    utts = []
    for i, sentence in enumerate(sentences):
        for voice in rng.sample(list(recipe.voices), recipe.voices_per_sentence):
            utts.append(Utterance(
                key=f"{split}_{i:06d}_{voice}", text=sentence, transcript=normalize_transcript(sentence),
                voice=voice, duration_stretch=round(rng.uniform(*recipe.duration_stretch), 3),
                f0_scale=round(rng.uniform(*recipe.f0_scale), 3)))
    return utts


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ================================================================================================ workers
_PROGRESS_QUEUE = None


def _init_worker(queue) -> None:
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = queue
    torch.set_num_threads(1)


@contextlib.contextmanager
def atomic_tar(path: Path) -> Iterator[wds.TarWriter]:
    """Write a tar under a temporary name and rename it when complete: a present shard is a finished shard."""
    tmp = path.with_name(path.name + ".partial")
    with wds.TarWriter(str(tmp)) as sink:
        yield sink
    os.replace(tmp, path)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def synthesize_shard(job: tuple[str, list[Utterance], dict[str, Any], str]) -> str:
    """Speak a shard's utterances with flite and store audio + MFCC features in a work tar (one job, one tar)."""
    split, utts, encoder_config, out_path = job
    encoder = _cached_encoder(encoder_config)
    binary = flite_binary()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp, \
            atomic_tar(Path(out_path)) as sink:
        wav_path = os.path.join(tmp, "utt.wav")
        for utt in utts:
            alignment = synthesize(utt, wav_path, binary)
            with open(wav_path, "rb") as f:
                raw = f.read()
            wave, _ = read_audio(raw, target_sample_rate=TARGET_SAMPLE_RATE, name=utt.key)
            source_rate = audio_info(raw, name=utt.key).samplerate
            meta = dict(key=utt.key, split=split, text=utt.text, voice=utt.voice, sample_rate=TARGET_SAMPLE_RATE,
                        source_sample_rate=source_rate, duration=round(len(wave) / TARGET_SAMPLE_RATE, 4),
                        duration_stretch=utt.duration_stretch, f0_scale=utt.f0_scale, phones=alignment,
                        source="wordnet+flite")
            sink.write({"__key__": utt.key, "flac": encode_audio(wave, TARGET_SAMPLE_RATE),
                        "txt": utt.transcript, "json": meta, FEATS_MEMBER: _npy(encoder(wave).numpy())})
            if _PROGRESS_QUEUE is not None:
                _PROGRESS_QUEUE.put(1)
    return out_path


# ================================================================================================ build
@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One BLAS/OpenMP thread for torch and scikit-learn: many small ops on a busy 2-core machine run 5-50x
    faster than with oversubscribed thread pools (measured: MFCC 1.6 ms vs 87 ms, k-means 2.5 s vs 12 s)."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _build_lock(corpus_dir: Path):
    corpus_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(corpus_dir.with_name(corpus_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent builders (DDP ranks, tests) wait, then hit the cache
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=False)


def _run_synthesis(jobs: list, num_workers: int, progress, n_utts: int) -> None:
    task = progress.add_task("speaking (flite)", total=n_utts)
    done = sum(len(j[1]) for j in jobs if Path(j[3]).is_file())
    progress.update(task, completed=done)
    todo = [j for j in jobs if not Path(j[3]).is_file()]  # resumable: finished work shards are kept
    if not todo:
        return
    if num_workers <= 1:
        for job in todo:
            synthesize_shard(job)
            progress.advance(task, len(job[1]))
        return
    ctx = mp.get_context("spawn")  # fork after torch has started its thread pools can hang
    queue = ctx.SimpleQueue()
    # an executor, not mp.Pool: a worker that dies (killed, or failing while it starts) breaks the build with an
    # error instead of being replaced forever while the build waits
    with ProcessPoolExecutor(num_workers, mp_context=ctx, initializer=_init_worker, initargs=(queue,)) as pool:
        pending = [pool.submit(synthesize_shard, job) for job in todo]
        failed = []
        while not failed and (not all(f.done() for f in pending) or not queue.empty()):
            while not queue.empty():
                progress.advance(task, queue.get())
            wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
            failed = [f for f in pending if f.done() and f.exception() is not None]
        for f in pending:
            f.cancel()  # after a failure: do not start the shards still queued
    if failed:
        if isinstance(failed[0].exception(), BrokenProcessPool):
            raise RuntimeError("a flite synthesis worker died before finishing its shard (see the error above "
                               "this one); the finished shards are kept and the next build resumes") \
                from failed[0].exception()
        raise failed[0].exception()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (the checksum manifests record per shard)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_work_shard(path: Path) -> Iterator[dict]:
    yield from wds.tarfile_samples([{"url": str(path)}])


def build_demo_corpus(
    recipe: DemoCorpusRecipe | dict | None = None,
    data_dir: str | os.PathLike = "data",
    num_workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Build the corpus for `recipe` under `<data_dir>/demo/<hash>` unless it is already there; return the dir."""
    if getattr(mp.current_process(), "_inheriting", False):  # how multiprocessing itself detects this case
        raise RuntimeError("build_demo_corpus was called while a spawned synthesis worker was importing the script "
                           "that started the build: put that call under `if __name__ == \"__main__\":`")
    recipe = DemoCorpusRecipe.from_any(recipe)
    corpus_dir = corpus_dir_for(recipe, data_dir)
    with _build_lock(corpus_dir):
        if is_built(recipe, data_dir):
            return corpus_dir
        start = time.time()
        flite_binary()
        check_voices(recipe.voices)
        work = corpus_dir / ".work"
        for sub in ("speech", "text", "tokenizer", "unit_extractor"):
            shutil.rmtree(corpus_dir / sub, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        (corpus_dir / "recipe.json").write_text(json.dumps(recipe.canonical(), indent=2))
        sentences = select_sentences(recipe)
        num_workers = num_workers or os.cpu_count() or 1
        jobs = []
        for split in SPEECH_SPLITS:
            utts = plan_utterances(recipe, split, sentences[split])
            for j, chunk in enumerate(chunks(utts, recipe.shard_size)):
                jobs.append((split, chunk, recipe.encoder_config(), str(work / f"{split}-{j:05d}.tar")))
        n_utts = sum(len(j[1]) for j in jobs)
        front_end = _front_end_corpus(recipe, sentences, data_dir, num_workers, progress)
        with _progress(progress) as bar, single_threaded():
            _run_synthesis(jobs, num_workers, bar, n_utts)
            extractor = UnitExtractor.load(front_end / "unit_extractor") if front_end else \
                _fit_extractor(recipe, [Path(j[3]) for j in jobs if j[0] == "train"], bar)
            extractor.save(corpus_dir / "unit_extractor")
            speech = _write_speech_shards(corpus_dir, jobs, extractor, bar)
        text = _write_text_shards(corpus_dir, sentences["text"], recipe.shard_size * 4)
        tok = MoSTTokenizer.train([normalize_transcript(s) for s in sentences["train"] + sentences["text"]],
                                  vocab_size=recipe.text_vocab_size, n_units=recipe.n_units)
        tok.save(corpus_dir / "tokenizer")
        manifest = dict(
            format="most_lightning.corpus", version=CORPUS_VERSION, recipe=recipe.canonical(),
            recipe_hash=recipe.hash(), sample_rate=TARGET_SAMPLE_RATE, frame_rate=extractor.frame_rate,
            n_units=recipe.n_units, units_deduplicated=False, tokenizer="tokenizer", unit_extractor="unit_extractor",
            vocab_size=tok.vocab_size, speech=speech, text=text, build_seconds=round(time.time() - start, 1),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        tmp = corpus_dir / (MANIFEST + ".partial")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, corpus_dir / MANIFEST)
        shutil.rmtree(work, ignore_errors=True)
        log.info("built demo corpus %s in %.1f s", corpus_dir, time.time() - start)
        return corpus_dir


def _front_end_corpus(recipe: DemoCorpusRecipe, sentences: dict[str, list[str]], data_dir, num_workers: int,
                      progress: bool) -> Path | None:
    """The directory of the corpus whose unit extractor `recipe` reuses (built first if it is not cached), after
    checking that it never heard this corpus's held-out sentences; None when the recipe fits its own."""
    source = recipe.front_end_recipe()
    if source is None:
        return None
    held_out = {normalize_transcript(s) for split in ("test", "validation") for s in sentences[split]}
    heard = {normalize_transcript(s) for split in SPEECH_SPLITS for s in select_sentences(source)[split]}
    overlap = held_out & heard
    if overlap:
        raise ValueError(f"unit_extractor_from: the front-end corpus speaks {len(overlap)} of this corpus's test/"
                         f"validation sentences (e.g. {sorted(overlap)[0]!r}); give it other sentences (e.g. "
                         f"min_words above this corpus's max_words={recipe.max_words}) or another seed")
    source_dir = build_demo_corpus(source, data_dir, num_workers=num_workers, progress=progress)
    log.info("units from the unit extractor of the front-end corpus %s", source_dir)
    return source_dir


def _fit_extractor(recipe: DemoCorpusRecipe, train_work: list[Path], progress) -> UnitExtractor:
    if recipe.unit_model == "phone_classifier":
        return _fit_phone_classifier(recipe, train_work, progress)
    task = progress.add_task("fitting k-means", total=None)
    feats = [] if recipe.unit_quantizer else [
        torch.from_numpy(np.load(io.BytesIO(s[FEATS_MEMBER]), allow_pickle=False))
        for path in train_work for s in _read_work_shard(path)]
    encoder = _cached_encoder(recipe.encoder_config())
    if recipe.unit_quantizer:  # a given k-means model (e.g. the reference's 500 centroids of HuBERT layer 11)
        quantizer = KMeansQuantizer.load(recipe.unit_quantizer, expected_dim=encoder.dim,
                                         feature_source=f"the unit encoder ({_describe_encoder(encoder)})")
        if quantizer.n_units != recipe.n_units:
            raise ValueError(f"k-means quantizer {recipe.unit_quantizer} has {quantizer.n_units} centroids but the "
                             f"corpus recipe asks for n_units={recipe.n_units}: set data.corpus.n_units="
                             f"{quantizer.n_units}")
        progress.update(task, total=1, completed=1)
        return UnitExtractor(encoder, quantizer)
    frames = sample_frames(feats, recipe.kmeans_max_frames, recipe.seed)
    if frames.shape[0] < recipe.n_units:
        raise ValueError(f"only {frames.shape[0]} train frames to fit {recipe.n_units} units: raise n_train or "
                         "lower n_units")
    # HuBERT k-means is fitted on raw features (as the reference's); MFCC dimensions are standardised first
    quantizer = KMeansQuantizer.fit(frames, recipe.n_units, seed=recipe.seed, standardize=not recipe.unit_encoder)
    progress.update(task, total=1, completed=1)
    return UnitExtractor(encoder, quantizer)


def _fit_phone_classifier(recipe: DemoCorpusRecipe, train_work: list[Path], progress) -> UnitExtractor:
    encoder = _cached_encoder(recipe.encoder_config())
    feats, labels = [], []
    for path in train_work:
        for s in _read_work_shard(path):
            f = torch.from_numpy(np.load(io.BytesIO(s[FEATS_MEMBER]), allow_pickle=False))
            feats.append(f)
            labels.append(frame_phones(json.loads(s["json"])["phones"], f.shape[0], encoder.frame_rate))
    n_phones = len({p for lab in labels for p in lab})
    if n_phones > recipe.n_units:
        raise ValueError(f"the train alignments have {n_phones} phones but the corpus recipe has n_units="
                         f"{recipe.n_units}: set data.corpus.n_units >= {n_phones}")
    task = progress.add_task("fitting phone classifier", total=None)
    quantizer = PhoneClassifierQuantizer.fit(
        feats, labels, seed=recipe.seed, **recipe.phone_classifier_settings(),
        on_epoch=lambda done, total: progress.update(task, completed=done, total=total))
    return UnitExtractor(encoder, quantizer)


_ENCODERS: dict[str, Any] = {}  # per process: a checkpoint is read once, not once per shard


def _cached_encoder(config: dict[str, Any]):
    from ..audio.features import build_encoder

    key = json.dumps(config, sort_keys=True)
    if key not in _ENCODERS:
        _ENCODERS[key] = build_encoder(config)
    return _ENCODERS[key]


def _describe_encoder(encoder) -> str:
    layer = getattr(encoder, "layer", None)
    return f"{encoder.kind}{f' layer {layer}' if layer is not None else ''}, {encoder.dim}-d"



def _write_speech_shards(corpus_dir: Path, jobs: list, extractor: UnitExtractor, progress) -> dict[str, Any]:
    out_dir = corpus_dir / "speech"
    out_dir.mkdir(parents=True, exist_ok=True)
    task = progress.add_task("writing units", total=len(jobs))
    splits: dict[str, Any] = {s: {"shards": [], "utterances": 0, "sentences": 0, "hours": 0.0} for s in SPEECH_SPLITS}
    held_out: tuple[list[str], list[list[int]]] = ([], [])  # validation alignments + units, for unit PNMI
    for split, utts, _, work_path in jobs:
        path = out_dir / Path(work_path).name
        seconds = 0.0
        with atomic_tar(path) as sink:
            for s in _read_work_shard(Path(work_path)):
                feats = torch.from_numpy(np.load(io.BytesIO(s[FEATS_MEMBER]), allow_pickle=False))
                units = extractor.quantizer(feats).numpy().astype(np.int16)
                meta = json.loads(s["json"])
                seconds += meta["duration"]
                if split == "validation":
                    held_out[0].append(meta["phones"])
                    held_out[1].append(units.tolist())
                sink.write({"__key__": s["__key__"], "flac": s["flac"], "txt": s["txt"], "json": s["json"],
                            "units.npy": _npy(units)})
        entry = splits[split]
        entry["shards"].append({"path": f"speech/{path.name}", "samples": len(utts), "seconds": round(seconds, 2),
                                "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        entry["utterances"] += len(utts)
        entry["hours"] = round(entry["hours"] + seconds / 3600, 4)
        progress.advance(task)
    for split in SPEECH_SPLITS:
        splits[split]["sentences"] = len({u.transcript for job in jobs if job[0] == split for u in job[1]})
    score, purity = utterance_pnmi(*held_out, frame_rate=extractor.frame_rate)
    splits["validation"]["unit_pnmi"], splits["validation"]["unit_phone_purity"] = round(score, 4), round(purity, 4)
    if isinstance(extractor.quantizer, PhoneClassifierQuantizer):  # its units name phones
        phones = extractor.quantizer.phones
        per = phone_error_rate(held_out[0], [[phones[u] for u in seq] for seq in held_out[1]])
        splits["validation"]["unit_phone_error_rate"] = round(per, 4)
    return splits


def _write_text_shards(corpus_dir: Path, sentences: list[str], shard_size: int) -> dict[str, Any]:
    out_dir = corpus_dir / "text"
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for j, chunk in enumerate(chunks(sentences, shard_size)):
        path = out_dir / f"text-{j:05d}.tar"
        with atomic_tar(path) as sink:
            for i, sentence in enumerate(chunk):
                key = f"text_{j * shard_size + i:06d}"
                sink.write({"__key__": key, "txt": normalize_transcript(sentence),
                            "json": {"key": key, "text": sentence, "source": "wordnet"}})
        shards.append({"path": f"text/{path.name}", "samples": len(chunk), "bytes": path.stat().st_size,
                       "sha256": sha256_file(path)})
    return {"shards": shards, "sentences": len(sentences)}


# ================================================================================================ CLI
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = DemoCorpusRecipe()
    p = argparse.ArgumentParser(
        prog="python -m most_lightning.data.demo_corpus",
        description="Build (or find cached) the demo speech+text corpus: WordNet sentences spoken by flite, "
                    "WebDataset shards with k-means units, a tokenizer and a manifest.")
    p.add_argument("--data-dir", default="data", help="cache root; the corpus goes to <data-dir>/demo/<recipe-hash>")
    p.add_argument("--n-train", type=int, default=d.n_train, help="train sentences")
    p.add_argument("--n-val", type=int, default=d.n_val, help="validation sentences")
    p.add_argument("--n-test", type=int, default=d.n_test, help="test sentences")
    p.add_argument("--n-text", type=int, default=d.n_text, help="text-only sentences for text LM")
    p.add_argument("--voices", default=",".join(d.voices), help="comma-separated flite voices")
    p.add_argument("--voices-per-sentence", type=int, default=d.voices_per_sentence)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--n-units", type=int, default=d.n_units, help="k-means units (phone_classifier: at most)")
    p.add_argument("--unit-model", choices=UNIT_MODELS, default=d.unit_model, help="how frames become units")
    p.add_argument("--cmvn", choices=("none", "utterance"), default="none", help="MFCC mean/variance normalisation")
    p.add_argument("--mfcc", type=json.loads, default={}, metavar="JSON",
                   help='more MFCC settings, e.g. \'{"hop_length": 320, "frame_stack": 2}\' (50 Hz frames)')
    p.add_argument("--phone-classifier", type=json.loads, default={}, metavar="JSON",
                   help=f"phone-classifier settings over {PHONE_CLASSIFIER_DEFAULTS}, e.g. '{{\"context\": 8}}'")
    p.add_argument("--text-vocab-size", type=int, default=d.text_vocab_size, help="BPE vocabulary size")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="utterances per speech shard")
    p.add_argument("--num-workers", type=int, default=None, help="parallel synthesis processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-dir", action="store_true", help="only print the corpus directory for these settings")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    recipe = DemoCorpusRecipe(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, n_text=args.n_text,
                              voices=tuple(v for v in args.voices.split(",") if v),
                              voices_per_sentence=args.voices_per_sentence, seed=args.seed, n_units=args.n_units,
                              text_vocab_size=args.text_vocab_size, shard_size=args.shard_size,
                              unit_model=args.unit_model, phone_classifier=args.phone_classifier,
                              mfcc={**({"cmvn": args.cmvn} if args.cmvn != "none" else {}), **args.mfcc})
    if args.print_dir:
        print(corpus_dir_for(recipe, args.data_dir))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus_dir = build_demo_corpus(recipe, args.data_dir, args.num_workers, progress=not args.no_progress)
    m = load_manifest(corpus_dir)
    for split, e in m["speech"].items():
        print(f"{split:>10}: {e['utterances']} utterances, {e['sentences']} sentences, {e['hours']:.2f} h, "
              f"{len(e['shards'])} shards")
    print(f"{'text':>10}: {m['text']['sentences']} sentences, {len(m['text']['shards'])} shards")
    quality = {k: v for k, v in m["speech"]["validation"].items() if k.startswith("unit_")}
    print("validation units: " + ", ".join(f"{k} {v}" for k, v in quality.items()))
    print(f"built in {m['build_seconds']} s -> {corpus_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
