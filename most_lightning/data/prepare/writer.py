"""The shard writer every preparer shares: planned items -> WebDataset shards + manifest, in parallel, resumable.

Output directory:
    {split}-NNNNN.tar   shards (members in sorted order, mtime 0, fixed owner: same inputs -> same bytes)
    progress.jsonl      plan hash, then one line per finished shard (the resume record)
    skipped.tsv         every skipped input: split, key, reason, detail
    manifest.json       written last: counts, hours, bytes and sha256 per shard, bad-input counts

Shards are planned up front from the items (by sample count or by estimated bytes), so the shard a sample lands
in never depends on the number of workers or on what finished first. Each shard is written under a temporary
name and renamed when complete, then recorded in progress.jsonl: a killed run leaves only whole shards, and the
next run with the same plan skips every recorded shard whose file is still there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import webdataset as wds

from ..demo_corpus import sha256_file
from .build import BuildOptions, build_sample
from .common import BadInputs, Item, Skip, log, log_skips

FORMAT = "most_lightning.prepared/1"
MANIFEST, PROGRESS, SKIPPED = "manifest.json", "progress.jsonl", "skipped.tsv"
TAR_MTIME = 0.0  # fixed member mtime: byte-identical shards across runs


class PlanMismatchError(RuntimeError):
    pass


@dataclass(frozen=True)
class ShardTarget:
    samples: int | None = None
    bytes: int | None = None

    @classmethod
    def parse(cls, text: str | int) -> "ShardTarget":
        """'500' -> 500 samples per shard; '64MB' / '0.5GB' / '800KB' -> about that many bytes per shard."""
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]B)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise ValueError(f"shard size {text!r}: give a sample count (500) or a size (64MB, 1GB, 800KB)")
        value, unit = float(m.group(1)), (m.group(2) or "").upper()
        if not unit:
            if value < 1 or value != int(value):
                raise ValueError(f"shard size {text!r}: a sample count must be a positive integer")
            return cls(samples=int(value))
        n = int(value * {"KB": 1e3, "MB": 1e6, "GB": 1e9}[unit])
        if n < 1:
            raise ValueError(f"shard size {text!r} must be positive")
        return cls(bytes=n)

    def describe(self) -> str:
        return f"{self.samples} samples" if self.samples else f"~{self.bytes / 1e6:g} MB"


@dataclass
class Job:
    name: str  # shard file name
    split: str
    items: list[Item]


def plan_shards(items_by_split: dict[str, list[Item]], target: ShardTarget) -> list[Job]:
    """Consecutive items per split into shards: `target.samples` each, or greedily up to `target.bytes`
    of estimated size (an item larger than the target gets a shard of its own)."""
    jobs = []
    for split in sorted(items_by_split):
        items, chunks, current, size = items_by_split[split], [], [], 0
        for item in items:
            full = (len(current) >= target.samples) if target.samples else \
                (current and size + item.est_bytes > target.bytes)
            if full:
                chunks.append(current)
                current, size = [], 0
            current.append(item)
            size += item.est_bytes
        if current:
            chunks.append(current)
        jobs += [Job(f"{split}-{i:05d}.tar", split, chunk) for i, chunk in enumerate(chunks)]
    return jobs


def plan_hash(jobs: list[Job], build: BuildOptions, target: ShardTarget) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT, "build": build.canonical(),
                                   "target": dataclasses.asdict(target)}, sort_keys=True).encode())
    for job in jobs:
        h.update(json.dumps([job.name, [type(i).__name__ for i in job.items],
                             [dataclasses.asdict(i) for i in job.items]], sort_keys=True).encode())
    return h.hexdigest()[:16]


# ================================================================================================ one shard
_PROGRESS_QUEUE = None


def _init_worker(queue) -> None:
    import torch

    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = queue
    torch.set_num_threads(1)


def write_shard(job: Job, out_dir: str, build: BuildOptions, policy: str) -> dict[str, Any]:
    """Build and write one shard atomically; return its progress record (counts, skips, checksum)."""
    path = Path(out_dir) / job.name
    tmp = path.with_name(path.name + ".partial")
    bad = BadInputs(policy)
    fixed: dict[str, int] = {}
    samples, seconds = 0, 0.0
    with open(tmp, "wb") as stream:
        sink = wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME, user="most", group="most", mode=0o444)
        try:
            for item in job.items:
                secs = 0.0
                try:
                    sample, secs = build_sample(item, build, fixed)
                except Skip as skip:
                    bad.skip(item.key, skip.reason, skip.detail)  # raises BadInputError under 'raise'
                else:
                    sink.write(sample)
                    samples += 1
                    seconds += secs
                if _PROGRESS_QUEUE is not None:
                    _PROGRESS_QUEUE.put((1, secs))
        finally:
            sink.close()  # on an error too: the .partial file is discarded by the next run
    record = {"name": job.name, "split": job.split, "samples": samples, "seconds": round(seconds, 3),
              "skipped": bad.skipped, "fixed": dict(sorted(fixed.items()))}
    if samples:
        os.replace(tmp, path)
        record.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    else:  # nothing usable: no empty shard for loaders to trip over
        tmp.unlink()
        path.unlink(missing_ok=True)
    return record


def _write_shard_job(args: tuple) -> dict[str, Any]:
    return write_shard(*args)


# ================================================================================================ driver
def _progress_bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[hours]:.2f} h"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled)


def _read_progress(out: Path, expected_plan: str, overwrite: bool, n_jobs: int) -> dict[str, dict]:
    """Finished shards of an earlier run of the same plan (name -> record)."""
    progress = out / PROGRESS
    if not progress.is_file():
        if not overwrite and any(_is_output(f.name) for f in out.iterdir()):
            raise PlanMismatchError(f"{out} already holds shards or a manifest not written by a preparation "
                                    "(no progress.jsonl): use another --out, or --overwrite to replace them")
        return {}
    lines = progress.read_text().splitlines()
    header = json.loads(lines[0]) if lines else {}
    if header.get("plan") != expected_plan:
        if not overwrite:
            raise PlanMismatchError(
                f"{out} holds a preparation of other inputs or options (plan {header.get('plan')}, now "
                f"{expected_plan}): use another --out, or --overwrite to discard it")
        return {}
    done = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill: that shard is simply redone
            continue
        if record["samples"] == 0 or ((out / record["name"]).is_file()
                                      and (out / record["name"]).stat().st_size == record.get("bytes")):
            done[record["name"]] = record
    log.info("resuming: %d of %d shards already written", len(done), n_jobs)
    return done


def _is_output(name: str) -> bool:
    return name in (MANIFEST, PROGRESS, SKIPPED) or re.fullmatch(r".+-\d{5}\.tar(\.partial)?", name) is not None


def _clear_outputs(out: Path) -> None:
    for f in out.iterdir():
        if _is_output(f.name):
            f.unlink()


def _append(progress_file, record: dict) -> None:
    progress_file.write(json.dumps(record, ensure_ascii=False) + "\n")
    progress_file.flush()
    os.fsync(progress_file.fileno())


def _run(todo: list[Job], out: Path, build: BuildOptions, policy: str, num_workers: int,
         bar, task) -> Iterator[dict]:
    args = [(job, str(out), build, policy) for job in todo]
    if num_workers <= 1:
        for a in args:
            record = write_shard(*a)
            bar.update(task, advance=len(a[0].items), hours=bar.tasks[task].fields["hours"] + record["seconds"] / 3600)
            yield record
        return
    import multiprocessing as mp

    # forkserver: workers fork from a clean server process that imported torch & co once (spawn re-imports them
    # in every worker: 11-14 s of start-up on a loaded 2-core machine vs 0.4-6 s); plain fork after torch has
    # started thread pools in this process (tests, notebooks) can hang.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([f"{__package__}.build"])
    q = ctx.SimpleQueue()
    with ctx.Pool(min(num_workers, len(args)), initializer=_init_worker, initargs=(q,)) as pool:
        results = pool.imap_unordered(_write_shard_job, args, chunksize=1)
        remaining = len(args)
        while remaining:
            while not q.empty():
                n, secs = q.get()
                bar.update(task, advance=n, hours=bar.tasks[task].fields["hours"] + secs / 3600)
            try:
                record = results.next(timeout=0.1)
            except mp.TimeoutError:
                continue
            except StopIteration:
                break
            remaining -= 1
            yield record


def prepare(source: str, kind: str, items_by_split: dict[str, list[Item]], plan_bad: BadInputs,
            build: BuildOptions, out_dir: str | os.PathLike, shard_size: str | int = "500",
            num_workers: int = 1, progress: bool = True, max_new_shards: int | None = None,
            overwrite: bool = False, info: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Write the shards and the manifest; return the manifest, or None when stopped by max_new_shards."""
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = ShardTarget.parse(shard_size)
    jobs = plan_shards(items_by_split, target)
    if not jobs:
        raise ValueError(f"{source}: nothing to prepare: no usable input found "
                         f"({sum(plan_bad.counts().values())} skipped: {plan_bad.counts()})")
    digest = plan_hash(jobs, build, target)
    manifest_path = out / MANIFEST
    if manifest_path.is_file() and not overwrite:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("plan_hash") == digest:
            log.info("%s is already prepared (same plan %s)", out, digest)
            return manifest
    done = _read_progress(out, digest, overwrite, len(jobs))
    if not done:
        _clear_outputs(out)
        (out / PROGRESS).write_text(json.dumps({"plan": digest, "source": source}) + "\n")
    for f in out.glob("*.partial"):  # pieces of shards a killed run was writing
        f.unlink()
    log_skips(plan_bad.skipped, Counter())
    todo = [job for job in jobs if job.name not in done]
    if max_new_shards is not None:
        todo = todo[:max_new_shards]
    n_items = sum(len(j.items) for j in jobs)
    logged: Counter = Counter()
    with _progress_bar(progress) as bar, open(out / PROGRESS, "a") as progress_file:
        task = bar.add_task(f"{source} -> {len(jobs)} shards", total=n_items,
                            completed=sum(len(j.items) for j in jobs if j.name in done),
                            hours=sum(r["seconds"] for r in done.values()) / 3600)
        for record in _run(todo, out, build, plan_bad.policy, num_workers, bar, task):
            _append(progress_file, record)
            log_skips(record["skipped"], logged)
            done[record["name"]] = record
    if len(done) < len(jobs):
        log.info("stopped after %d new shards (%d of %d written): run the same command again to continue",
                 len(todo), len(done), len(jobs))
        return None
    manifest = _manifest(source, kind, jobs, done, plan_bad, build, target, digest, info or {})
    _write_skipped(out, jobs, done, plan_bad)
    tmp = out / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, manifest_path)
    elapsed = time.time() - start
    log.info("%s: %d samples, %.3f h in %d shards -> %s (%.1f s this run)", source, manifest["samples"],
             manifest["hours"], sum(len(s["shards"]) for s in manifest["splits"].values()), out, elapsed)
    return manifest


def _manifest(source, kind, jobs, done, plan_bad, build, target, digest, info) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    skipped, fixed = Counter(plan_bad.counts()), Counter()
    for job in jobs:
        record = done[job.name]
        entry = splits.setdefault(job.split, {"samples": 0, "hours": 0.0, "shards": []})
        if record["samples"]:
            entry["shards"].append({"path": job.name, "samples": record["samples"], "seconds": record["seconds"],
                                    "bytes": record["bytes"], "sha256": record["sha256"]})
        entry["samples"] += record["samples"]
        entry["hours"] += record["seconds"] / 3600
        skipped.update(r for _, r, _ in record["skipped"])
        fixed.update(record["fixed"])
    for entry in splits.values():
        entry["hours"] = round(entry["hours"], 6)
    return {"format": FORMAT, "source": source, "kind": kind, "plan_hash": digest, **info,
            "options": {**build.canonical(), "shard_size": target.describe()},
            "samples": sum(e["samples"] for e in splits.values()),
            "hours": round(sum(e["hours"] for e in splits.values()), 6), "splits": splits,
            "bad_inputs": {"skipped": dict(sorted(skipped.items())), "fixed": dict(sorted(fixed.items())),
                           "list": SKIPPED}}


def _write_skipped(out: Path, jobs, done, plan_bad: BadInputs) -> None:
    rows = [(s, k, r, d) for s, (k, r, d) in zip(plan_bad.splits, plan_bad.skipped)]
    rows += [(job.split, k, r, d) for job in jobs for k, r, d in done[job.name]["skipped"]]
    clean = lambda s: str(s).replace("\t", " ").replace("\n", " ")  # noqa: E731
    (out / SKIPPED).write_text("split\tkey\treason\tdetail\n" + "".join(
        "\t".join(clean(c) for c in row) + "\n" for row in rows))
