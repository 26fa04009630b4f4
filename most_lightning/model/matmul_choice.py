"""``cpu_matmul=auto``: pick the faster fp32 matmul backend for this CPU by timing both, once per host.

Which backend wins depends mostly on the CPU. On the AMD EPYC hosts of the earlier measurements
(AVX-512 at full width) oneDNN ran the `tiny` step's products 1.7-1.8x faster than torch's MKL sgemm; on a Zen 4
host (CPU family 25, AVX-512 issued as two 256-bit halves) MKL's AVX2 kernel already reaches the core's peak
and oneDNN came out 0.93x (``python experiments/bench_cpu_matmul.py``). A fixed default is wrong on one kind of
host or the other, so ``auto`` measures: forward + backward of a `tiny` model's training step (1,024 tokens) on
each backend, interleaved, medians (``probe``). oneDNN is chosen only when it is at least ``ONEDNN_MARGIN`` faster
(torch's matmul is the reference path).

The choice is stored per host (CPU model, torch version, thread count) in ``cpu_matmul.json`` under
``$MOST_LIGHTNING_CACHE`` (else ``$XDG_CACHE_HOME/most_lightning``, else ``~/.cache/most_lightning``, else the
temp directory: ``cache_dir``), so every run on a host uses the same backend (runs stay bitwise repeatable) and
the ~2 s probe runs once. Delete the file to measure again; set
``model.cpu_matmul=onednn`` or ``torch`` to skip the choice.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

# oneDNN must be this much faster to be chosen: near a tie (Zen 4: 0.94x over repeated whole-step runs, single
# probes of either sign) torch's matmul is kept, the reference path with fewer copies; where oneDNN wins it wins
# by 1.3x and more (the earlier hosts).
ONEDNN_MARGIN = 0.10
PROBE_BATCH, PROBE_SEQ_LEN, PROBE_REPS = 4, 256, 5  # ~2 s on two cores, once per host
CACHE_FILE = "cpu_matmul.json"

# This process' choice, looked up before every product. One per process, not per thread count: the experts'
# worker threads run with one intra-op thread each and must not count as another host setting.
_choice: str | None = None


def cache_dir() -> Path:
    if "MOST_LIGHTNING_CACHE" in os.environ:
        return Path(os.environ["MOST_LIGHTNING_CACHE"])
    if "XDG_CACHE_HOME" in os.environ:
        return Path(os.environ["XDG_CACHE_HOME"]) / "most_lightning"
    try:
        return Path.home() / ".cache" / "most_lightning"
    except RuntimeError:  # no home directory (a service account): per machine, in the temp directory
        return Path(tempfile.gettempdir()) / "most_lightning"


@functools.cache
def _cpu_description() -> str:
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:  # the first processor's block is enough
                    break
    except OSError:
        pass
    if not fields:
        return platform.processor() or platform.machine()
    return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def host_key() -> str:
    """What the choice depends on: the CPU, the torch build (its MKL and oneDNN), the thread count."""
    return f"{_cpu_description()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def probe(reps: int = PROBE_REPS, batch: int = PROBE_BATCH, seq_len: int = PROBE_SEQ_LEN) -> dict[str, float]:
    """Median ms of one training step's forward + backward of the `tiny` preset (fused loss included), per
    backend, the two interleaved. A whole step, not single products: at equal product times the backends differ
    in what surrounds them (oneDNN's padded rows and transposed operands, the experts' per-thread products), and
    the step is what a run pays. Leaves the caller's random state, grad mode and autocast as they were."""
    from most_lightning.lit.losses import fused_token_losses
    from most_lightning.model.config import MoSTConfig
    from most_lightning.model.decoder import MoSTForCausalLM

    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast("cpu", enabled=False):
        torch.manual_seed(0)
        config = MoSTConfig.from_preset("tiny")
        models = {backend: MoSTForCausalLM(config.replace(cpu_matmul=backend)) for backend in ("onednn", "torch")}
        ids = torch.randint(0, config.vocab_size, (batch, seq_len))
        modality = (torch.arange(seq_len) >= seq_len // 2).long().expand(batch, -1)

        def step(backend: str) -> float:
            model = models[backend]
            start = time.perf_counter()
            out = model(ids, modality, compute_logits=False)
            loss = fused_token_losses(out.hidden, model.lm_head.weight, ids, modality, backend=backend).mean()
            (loss + out.aux_loss).backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        times: dict[str, list[float]] = {backend: [] for backend in models}
        for backend in times:  # warm-up: oneDNN builds its primitives, MKL its buffers
            step(backend)
        for _ in range(reps):
            for backend in times:
                times[backend].append(step(backend))
    return {backend: 1e3 * statistics.median(t) for backend, t in times.items()}


def decide(timings: dict[str, float]) -> str:
    return "onednn" if timings["onednn"] <= (1 - ONEDNN_MARGIN) * timings["torch"] else "torch"


def _read_cache(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, dict):
            raise ValueError("not a JSON object")
        return entries
    except (OSError, ValueError) as error:
        log.warning("cpu_matmul=auto: ignoring unreadable choice cache %s (%s); measuring again", path, error)
        return {}


def _write_cache(path: Path, entries: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as error:
        log.warning("cpu_matmul=auto: could not store the choice in %s (%s); it holds for this process only",
                    path, error)


def auto_backend(measure: Callable[[], dict[str, float]] | None = None) -> str:
    """The backend ``cpu_matmul=auto`` stands for in this process: decided at the first call, from the cache file
    entry for this host (and the thread count of that moment), else measured now and stored."""
    global _choice
    if _choice is None:
        _choice = _stored_or_measured(measure or probe)
    return _choice


def _stored_or_measured(measure: Callable[[], dict[str, float]]) -> str:
    key, path = host_key(), cache_dir() / CACHE_FILE
    entries = _read_cache(path)
    entry = entries.get(key)
    if isinstance(entry, dict) and entry.get("backend") in ("onednn", "torch"):
        choice = entry["backend"]
        log.info("cpu_matmul=auto: %s (chosen on %s: oneDNN %s ms, torch %s ms; %s)", choice, entry.get("measured"),
                 entry.get("onednn_ms"), entry.get("torch_ms"), path)
    else:
        timings = measure()
        choice = decide(timings)
        entries = _read_cache(path)  # another process may have written meanwhile
        entries[key] = dict(backend=choice, onednn_ms=round(timings["onednn"], 3),
                            torch_ms=round(timings["torch"], 3), measured=time.strftime("%Y-%m-%d %H:%M:%S"))
        _write_cache(path, entries)
        log.info("cpu_matmul=auto: oneDNN %.1f ms, torch %.1f ms on this CPU's probe -> %s (stored in %s)",
                 timings["onednn"], timings["torch"], choice, path)
    return choice


def forget_choice() -> None:
    """Drop this process' choice: the next product decides again (tests)."""
    global _choice
    _choice = None
