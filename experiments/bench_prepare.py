"""Preparation speed: hours of audio prepared per minute of wall time, per source layout and worker count.

    OMP_NUM_THREADS=1 python experiments/bench_prepare.py --hours 0.5 --reps 3

Builds one corpus per layout in a temporary directory (flite speech on WordNet sentences, copied to reach
--hours): LibriSpeech FLAC 16 kHz, Common Voice MP3 48 kHz (decode + resample), LibriHeavy segments of long
FLAC recordings; then prepares each with 1 and 2 workers, with and without units (MFCC + k-means, 500 units),
interleaving the configurations over --reps repetitions, and prints medians, hours/minute and the 2-vs-1-worker
ratio. Worker start-up (spawn + imports) is included: it is part of what a user waits for.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from most_lightning.audio.features import MFCCEncoder  # noqa: E402
from most_lightning.audio.units import UnitExtractor  # noqa: E402
from most_lightning.data.prepare.__main__ import run  # noqa: E402
from most_lightning.data.prepare.fixtures import (speak, write_commonvoice, write_libriheavy,  # noqa: E402
                                                  write_librispeech)
from most_lightning.data.text_sources import wordnet_sentences  # noqa: E402


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hours", type=float, default=0.5, help="audio per corpus")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--distinct", type=int, default=60, help="distinct flite utterances (copied to reach --hours)")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--sources", default="librispeech,commonvoice,libriheavy")
    args = p.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        t0 = time.time()
        base = speak(wordnet_sentences()[:: 97][: args.distinct])
        per_clip = sum(len(c.wave) for c in base) / len(base) / 16000
        clips = [base[i % len(base)] for i in range(int(args.hours * 3600 / per_clip))]
        hours = sum(len(c.wave) for c in clips) / 16000 / 3600
        sources = args.sources.split(",")
        inputs = {}
        if "librispeech" in sources:
            write_librispeech(root / "ls", "train-clean-100", clips, speakers=tuple(range(10, 30)))
            inputs["librispeech"] = ["librispeech", str(root / "ls" / "LibriSpeech")]
        if "commonvoice" in sources:
            write_commonvoice(root / "cv" / "en", {"train": clips})
            inputs["commonvoice"] = ["commonvoice", str(root / "cv" / "en" / "train.tsv")]
        if "libriheavy" in sources:
            path = write_libriheavy(root / "lh", "small", clips, per_recording=40)
            inputs["libriheavy"] = ["libriheavy", str(path), "--audio-root", str(root / "lh")]
        extractor = root / "units"
        UnitExtractor.fit([torch.from_numpy(c.wave) for c in base], n_units=500, encoder=MFCCEncoder()).save(extractor)
        print(f"corpora: {len(clips)} utterances, {hours:.3f} h each ({args.distinct} distinct flite utterances, "
              f"mean {per_clip:.2f} s); built in {time.time() - t0:.0f} s; cpus={os.cpu_count()} "
              f"load={loadavg()}", flush=True)
        configs = [(src, w, units) for src in inputs for units in (False, True)
                   for w in map(int, args.workers.split(","))]
        times: dict[tuple, list[float]] = {c: [] for c in configs}
        for rep in range(args.reps):
            for config in configs:
                src, workers, units = config
                out = root / "out"
                shutil.rmtree(out, ignore_errors=True)
                argv = [*inputs[src], "--out", str(out), "--num-workers", str(workers), "--no-progress",
                        "--shard-size", "200"] + (["--units", str(extractor)] if units else [])
                start = time.perf_counter()
                manifest = run(argv)
                times[config].append(time.perf_counter() - start)
                assert manifest["samples"] == len(clips), manifest["bad_inputs"]
            print(f"rep {rep + 1}/{args.reps} done, load={loadavg()}", flush=True)
        print(f"\n| source | units | workers | median s | hours/minute | 2 vs 1 workers |")
        print("|---|---|---|---|---|---|")
        for src, workers, units in configs:
            med = statistics.median(times[(src, workers, units)])
            one = statistics.median(times[(src, 1, units)]) if (src, 1, units) in times else med
            print(f"| {src} | {'yes' if units else 'no'} | {workers} | {med:.1f} | {hours / (med / 60):.2f} | "
                  f"{one / med:.2f}x |")
        print(f"\nload average at the end: {loadavg()}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
