"""How fast does the MoST model learn ASR? Held-out vs train-sentence WER against the number of ASR examples.

A bare training loop (no Lightning) over the same model, prompt format (docs/model_spec.md section 4), loss and LR
schedule as run.py, sampling tasks by weight from the demo corpus held in memory. Every --eval-every steps it
greedy-decodes --n-eval validation utterances (UNSEEN sentences) and as many train utterances: equal WERs mean the
model is not over-fitting but under-using the audio; a low train WER with a high unseen WER means it memorises
sentences. Made for quick sweeps on a GPU (one process per setting; they share the card), it also runs on the CPU.

    python experiments/asr_learning_sweep.py --device cuda --steps 8000 --mix 1,0,0 --lr 1e-3 --out sweep/base.json
    python experiments/asr_learning_sweep.py --device cuda --model '{"first_k_dense_replace": 4}' --router vanilla
    python experiments/asr_learning_sweep.py --n-train 3000      # fewer distinct sentences: the over-fitting check

Machines without the corpus (a GPU box): export it once with --export FILE.json.gz (stored units, k-means and
phone-classifier units over per-utterance-CMVN MFCC, flite's phone string as oracle units, transcripts, text),
then run there with --records FILE.json.gz --units base|cmvn|pcls|phone [--text-vocab 300] [--voice slt].
Results of two such sweeps: experiments/results/asr_frontend_sweep_h200.md.

Prints one JSON line per evaluation: step, asr_examples, real_tokens, asr_loss (train, last 100 batches),
wer_unseen, wer_train, seconds (training time only).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from most_lightning.audio.features import MFCCConfig, MFCCEncoder  # noqa: E402
from most_lightning.audio.phone_classifier import PhoneClassifierQuantizer  # noqa: E402
from most_lightning.audio.quality import frame_phones  # noqa: E402
from most_lightning.audio.quantizer import KMeansQuantizer  # noqa: E402
from most_lightning.audio.units import dedup_units, sample_frames  # noqa: E402
from most_lightning.data.collate import collate_asr_generation, collate_teacher_forced  # noqa: E402
from most_lightning.data.datamodule import MoSTDataModule  # noqa: E402
from most_lightning.data.samples import (  # noqa: E402
    BadSamplePolicy,
    decode_speech_sample,
    decode_text_sample,
    iter_records,
)
from most_lightning.data.tasks import TASKS, TaskFormatter  # noqa: E402
from most_lightning.model.token_losses import shifted_token_losses  # noqa: E402
from most_lightning.lit.schedule import linear_warmup_decay  # noqa: E402
from most_lightning.metrics.transcripts import TranscriptErrorRates  # noqa: E402
from most_lightning.model import MoSTConfig, MoSTForCausalLM, RouterConfig  # noqa: E402
from most_lightning.text.tokenizer import MoSTTokenizer  # noqa: E402

DEMO_LONG_CORPUS = dict(n_train=20000, n_val=200, n_test=200, n_text=15000)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--corpus", default=json.dumps(DEMO_LONG_CORPUS), help="DemoCorpusRecipe fields as JSON")
    p.add_argument("--n-train", type=int, default=None, help="use only the first N train utterances")
    p.add_argument("--mix", default="1,0,0", help="asr,tts,text sampling weights")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--router", default="vanilla")
    p.add_argument("--model", default="{}", help="MoSTConfig overrides of the tiny preset as JSON")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: longest reference + 8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the curve here as JSON")
    p.add_argument("--max-seconds", type=float, default=None, help="stop training after this much time, then evaluate")
    p.add_argument("--export", default=None, help="write the corpus with unit variants to this .json.gz and exit")
    p.add_argument("--records", default=None, help="read an --export file instead of the shards")
    p.add_argument("--units", default="base",
                   help="with --records: base (stored), cmvn, pcls (phone classifier) or phone (flite oracle)")
    p.add_argument("--text-vocab", type=int, default=None,
                   help="with --records: train a BPE of this size (300 ~ chars)")
    p.add_argument("--voice", default=None, help="with --records: train and evaluate on this flite voice only")
    return p.parse_args(argv)


@torch.no_grad()
def corpus_wer(model, records, fmt, tok, device, max_new_tokens, chunk=100) -> float:
    model.eval()
    metric = TranscriptErrorRates()
    for i in range(0, len(records), chunk):
        part = records[i : i + chunk]
        b = collate_asr_generation([fmt.asr_generation(r.units, r.transcript, r.key) for r in part], tok.pad_id,
                                   tok.modality_of)
        out = model.generate(b["prompt_ids"].to(device), b["prompt_modality"].to(device), b["prompt_mask"].to(device),
                             max_new_tokens=max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                             modality_of=tok.modality_of)
        hyps = []
        for row in out.tolist():
            hyps.append(tok.decode_text(row[: row.index(tok.eos_id)] if tok.eos_id in row else row))
        metric.update(hyps, [r.transcript for r in part])
    model.train()
    return float(metric.compute()["wer"])


def load_shards(a):
    """(tokenizer, train records, validation records, text sentences) from the demo corpus shards."""
    dm = MoSTDataModule.from_settings(data_dir=a.data_dir, corpus=json.loads(a.corpus), verify_audio="none")
    train, _ = dm.speech_records("train", a.n_train)
    val, _ = dm.speech_records("validation", a.n_eval)
    texts = [r.text for r in iter_records(dm.shards("text"), decode_text_sample, BadSamplePolicy())]
    return dm.tokenizer, train, val, texts


def load_records(a):
    """The same from an --export file, with the unit variant, tokenizer size and voice asked for."""
    with gzip.open(a.records, "rt") as f:
        data = json.load(f)

    def records(split):
        rows = [r for r in data["splits"][split] if a.voice in (None, r["voice"])]
        return [SimpleNamespace(key=r["key"], transcript=r["transcript"], units=dedup_units(r["units_" + a.units]))
                for r in rows]

    train, val = records("train")[: a.n_train], records("validation")[: a.n_eval]
    texts = data["texts"]
    if a.text_vocab:
        tok = MoSTTokenizer.train([r.transcript for r in train] + texts, vocab_size=a.text_vocab)
    else:
        tok = MoSTTokenizer.train([r.transcript for r in train] + texts)  # the corpus' recipe: BPE 2000
    return tok, train, val, texts


def export(a) -> None:
    """Per utterance: the stored units, k-means 500 over per-utterance-CMVN MFCC, a frame phone classifier over the
    same features (both fitted on train), and flite's phone string (the oracle); plus transcripts and text."""
    dm = MoSTDataModule.from_settings(data_dir=a.data_dir, corpus=json.loads(a.corpus), verify_audio="none")
    encoder = MFCCEncoder(MFCCConfig(cmvn="utterance"))
    out, feats, alignments = {"splits": {}}, {}, {}
    decode = lambda s: decode_speech_sample(s, dm.tokenizer.n_units, False, keep_audio=True)  # noqa: E731
    for split in ("train", "validation", "test"):
        rows = []
        for rec in iter_records(dm.shards(split), decode, BadSamplePolicy()):
            feats[rec.key] = encoder(torch.as_tensor(rec.audio, dtype=torch.float32))
            alignments[rec.key] = rec.meta["phones"]
            rows.append(dict(key=rec.key, voice=rec.meta["voice"], transcript=rec.transcript, units_base=rec.units))
        out["splits"][split] = rows
    train_keys = [r["key"] for r in out["splits"]["train"]]
    frame_labels = {k: frame_phones(alignments[k], len(feats[k]), encoder.frame_rate) for k in feats}
    kmeans = KMeansQuantizer.fit(sample_frames([feats[k] for k in train_keys], 200_000), 500)
    classifier = PhoneClassifierQuantizer.fit([feats[k] for k in train_keys], [frame_labels[k] for k in train_keys])
    phone_ids = {p: i for i, p in enumerate(classifier.phones)}
    for rows in out["splits"].values():
        for r in rows:
            f = feats[r["key"]]
            r["units_cmvn"], r["units_pcls"] = kmeans(f).tolist(), classifier(f).tolist()
            r["units_phone"] = [phone_ids.setdefault(p.rsplit(":", 1)[0], len(phone_ids))
                                for p in alignments[r["key"]].split()]
    out["texts"] = [r.text for r in iter_records(dm.shards("text"), decode_text_sample, BadSamplePolicy())]
    with gzip.open(a.export, "wt") as f:
        json.dump(out, f)


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    if a.export:
        return export(a)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    weights = [float(w) for w in a.mix.split(",")]
    if len(weights) != len(TASKS):
        raise SystemExit(f"--mix needs {len(TASKS)} weights ({','.join(TASKS)}), got {a.mix!r}")
    tok, train, val, texts = load_records(a) if a.records else load_shards(a)
    max_new_tokens = a.max_new_tokens or max(len(tok.encode_text(r.transcript)) for r in val + train[: a.n_eval]) + 8
    fmt = TaskFormatter(tok, 1024)
    cfg = MoSTConfig.from_preset("tiny", vocab_size=tok.vocab_size, router=RouterConfig(name=a.router),
                                 **json.loads(a.model))
    model = MoSTForCausalLM(cfg).to(a.device)
    matrices = [q for q in model.parameters() if q.ndim >= 2]
    vectors = [q for q in model.parameters() if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": matrices}, {"params": vectors}], lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = linear_warmup_decay(opt, a.warmup, a.steps, a.min_lr_ratio)

    def batch():
        examples = []
        for _ in range(a.batch_size):
            task = rng.choices(TASKS, weights)[0]
            if task == "text":
                examples.append(fmt.text_lm(rng.choice(texts)))
            else:
                r = rng.choice(train)
                examples.append(fmt.format(task, r.key, r.transcript, r.units))
        return collate_teacher_forced(examples, tok.pad_id, tok.modality_of)

    curve, asr_losses, n_asr, n_tokens, seconds = [], [], 0, 0, 0.0
    for step in range(1, a.steps + 1):
        start = time.perf_counter()
        b = batch()
        ids, modality, mask, labels = (b[k].to(a.device) for k in ("input_ids", "modality", "attention_mask", "labels"))
        out = model(ids, modality, attention_mask=mask)
        losses = shifted_token_losses(out.logits, labels, modality)
        opt.zero_grad(set_to_none=True)
        (losses.mean() + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        seconds += time.perf_counter() - start
        n_asr += sum(t == "asr" for t in b["task"])
        n_tokens += int(b["attention_mask"].sum())
        if "asr" in b["task"]:
            asr_losses.append(losses.mean(losses.task_mask(b["task"], "asr")).item())
        last = step == a.steps or (a.max_seconds is not None and seconds >= a.max_seconds)
        if step % a.eval_every == 0 or last:
            point = dict(step=step, asr_examples=n_asr, real_tokens=n_tokens,
                         asr_loss=round(sum(asr_losses[-100:]) / max(len(asr_losses[-100:]), 1), 4),
                         wer_unseen=round(corpus_wer(model, val, fmt, tok, a.device, max_new_tokens), 4),
                         wer_train=round(corpus_wer(model, train[: a.n_eval], fmt, tok, a.device, max_new_tokens), 4),
                         seconds=round(seconds, 1))
            curve.append(point)
            print(json.dumps(point), flush=True)
        if last:
            break
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(args=vars(a), curve=curve), indent=2))
    return curve


if __name__ == "__main__":
    main()
