"""Feature-extraction speed of the frozen HuBERT encoder (HuBERT-base shape, random weights: speed does not
depend on the values), in seconds of audio per second, side by side with transformers' HubertModel of the same
shape and the offline MFCC encoder. Rows interleaved repetition by repetition (helpers from bench_moe.py).

    python experiments/bench_hubert.py                 # 10 s utterance, 1 thread, CPU
    python experiments/bench_hubert.py --device cuda --threads 8
    python experiments/bench_hubert.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout before an installed copy
import torch  # noqa: E402

from bench_moe import Row, keep_freed_memory, malloc_note, print_table, run_interleaved  # noqa: E402

from most_lightning.audio import MFCCEncoder  # noqa: E402
from most_lightning.audio.hubert import HubertEncoder  # noqa: E402


def transformers_base(device: str):
    import transformers

    cfg = transformers.HubertConfig(attn_implementation="sdpa")  # hubert-base-ls960 numbers (50 Hz)
    return transformers.HubertModel(cfg).eval().to(device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="utterance length")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="2 s, 2 repetitions")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.reps = 2.0, 2
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    torch.manual_seed(0)
    wave = (0.1 * torch.randn(int(args.seconds * 16000))).to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def encoder_row(name: str, enc) -> Row:
        enc = enc.to(args.device) if isinstance(enc, torch.nn.Module) else enc

        def step():
            enc(wave)
            sync()
        return Row(name, step)

    hf = transformers_base(args.device)

    def hf_step():
        with torch.no_grad():
            hf(wave[None])
        sync()

    rows = [
        encoder_row("ours base 50 Hz, layer 11", HubertEncoder.random("base", layer=11)),
        encoder_row("ours base 50 Hz, last layer", HubertEncoder.random("base", layer="last")),
        encoder_row("ours base 25 Hz stack, layer 11", HubertEncoder.random("base_25hz", layer=11)),
        Row("transformers HubertModel base (full)", hf_step),
    ]
    if args.device == "cpu":
        mfcc = MFCCEncoder()
        rows.append(Row("MFCC 25 Hz (offline default)", lambda: mfcc(wave)))
    run_interleaved(rows, args.reps, warmup=1, wait_budget=120.0)
    note = (f"{args.seconds:.0f} s utterance, {args.threads} thread(s), {args.device}; torch "
            f"{torch.__version__}; {malloc_note(kept)}")
    print_table("HuBERT feature extraction", rows, "transformers HubertModel base (full)", note)
    speeds = {}
    for row in rows:
        speeds[row.name] = args.seconds / statistics.median(row.times)
        print(f"{row.name:<40} {speeds[row.name]:8.1f} s of audio per second (median)")
    return speeds


if __name__ == "__main__":
    main()
