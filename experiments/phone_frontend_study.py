"""Phone-classifier front ends side by side: phone error rate (PER) on unseen sentences for each variant.

The demo_long_asr learning check reads phone-classifier units (most_lightning/audio/phone_classifier.py); its WER
follows the units' PER (docs/learning_check.md). This study fits each variant on the same train utterances of a
built corpus and prints, per variant: frame accuracy, PER of the deduplicated unit string against flite's phone
string, its insertion/deletion/substitution split, units per utterance, fit seconds; plus the PER a perfect frame
classifier would have at each frame rate (phones shorter than a frame vanish).

    python experiments/phone_frontend_study.py --corpus data/demo/35550bd9264f --n-train 8000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from most_lightning.audio import read_audio  # noqa: E402
from most_lightning.audio.features import MFCCConfig, MFCCEncoder  # noqa: E402
from most_lightning.audio.phone_classifier import PhoneClassifierQuantizer  # noqa: E402
from most_lightning.audio.quality import frame_phones, phone_error_rate  # noqa: E402
from most_lightning.audio.units import dedup_units  # noqa: E402
from most_lightning.data.testing import read_shard  # noqa: E402

# name -> (MFCC settings, classifier settings)
VARIANTS = {
    "25 Hz, +-5 frames (demo_long_asr)": (dict(hop_length=640, frame_stack=4), dict(context=5)),
    "50 Hz, +-10 frames": (dict(hop_length=320, frame_stack=2), dict(context=10)),
    "50 Hz, +-8 frames": (dict(hop_length=320, frame_stack=2), dict(context=8)),
}


def read_split(corpus: Path, split: str, limit: int):
    """[(wave, flite phone alignment)] of the first `limit` utterances of a split."""
    out = []
    for shard in sorted((corpus / "speech").glob(f"{split}-*.tar")):
        for sample in read_shard(shard):
            wave, _ = read_audio(sample["flac"])
            out.append((torch.as_tensor(wave, dtype=torch.float32), json.loads(sample["json"])["phones"]))
            if len(out) == limit:
                return out
    return out


def edit_counts(ref, hyp):
    """(substitutions, deletions, insertions) of the cheapest alignment of hyp to ref."""
    n, m = len(ref), len(hyp)
    d = [[(j, 0, 0, j) for j in range(m + 1)]] + [[(i, 0, i, 0)] + [None] * m for i in range(1, n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            c, s, dl, ins = d[i - 1][j - 1]
            best = (c + (ref[i - 1] != hyp[j - 1]), s + (ref[i - 1] != hyp[j - 1]), dl, ins)
            c, s, dl, ins = d[i - 1][j]
            best = min(best, (c + 1, s, dl + 1, ins))
            c, s, dl, ins = d[i][j - 1]
            d[i][j] = min(best, (c + 1, s, dl, ins + 1))
    return d[n][m][1:]


def evaluate(quantizer, feats, alignments, frame_rate):
    correct = frames = 0
    sub = dele = ins = n_ref = n_units = 0
    for f, ali in zip(feats, alignments):
        pred = [quantizer.phones[i] for i in quantizer(f).tolist()]
        labels = frame_phones(ali, f.shape[0], frame_rate)
        correct += sum(p == q for p, q in zip(pred, labels))
        frames += len(labels)
        ref = dedup_units([x.rsplit(":", 1)[0] for x in ali.split()])
        hyp = dedup_units(pred)
        s, d, i = edit_counts(ref, hyp)
        sub, dele, ins, n_ref, n_units = sub + s, dele + d, ins + i, n_ref + len(ref), n_units + len(hyp)
    return dict(frame_acc=correct / frames, per=(sub + dele + ins) / n_ref, sub=sub / n_ref, dele=dele / n_ref,
                ins=ins / n_ref, units_per_utt=n_units / len(feats))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="a built demo corpus directory (data/demo/<hash>)")
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--n-eval", type=int, default=400, help="test utterances (unseen sentences)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--penalties", type=float, nargs="*", default=[0.0, 1.0, 2.0, 4.0, 8.0],
                   help="Viterbi switch penalties to decode each variant with (0: per-frame argmax)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from VARIANTS")
    a = p.parse_args(argv)
    corpus = Path(a.corpus)
    train, test = read_split(corpus, "train", a.n_train), read_split(corpus, "test", a.n_eval)
    print(f"{len(train)} train / {len(test)} test utterances from {corpus}")
    for rate in (25, 50):
        alignments = [ali for _, ali in test]
        labels = [frame_phones(ali, int(len(wave) / 16000 * rate), rate) for wave, ali in test]
        print(f"perfect frame classifier at {rate} Hz: PER {phone_error_rate(alignments, labels):.4f}")
    print("| variant | switch penalty | frame acc | PER | sub | del | ins | units/utt | fit s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.variants:
        mfcc, cls = VARIANTS[name]
        encoder = MFCCEncoder(MFCCConfig(cmvn="utterance", **mfcc))
        tr_f = [encoder(w) for w, _ in train]
        tr_l = [frame_phones(ali, f.shape[0], encoder.frame_rate) for f, (_, ali) in zip(tr_f, train)]
        start = time.time()
        q = PhoneClassifierQuantizer.fit(tr_f, tr_l, epochs=a.epochs, **cls)
        fit_s = time.time() - start
        te_f = [encoder(w) for w, _ in test]
        for penalty in a.penalties:
            q.switch_penalty = penalty
            r = evaluate(q, te_f, [ali for _, ali in test], encoder.frame_rate)
            print(f"| {name} | {penalty:g} | {r['frame_acc']:.3f} | {r['per']:.4f} | {r['sub']:.4f} | "
                  f"{r['dele']:.4f} | {r['ins']:.4f} | {r['units_per_utt']:.1f} | {fit_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
