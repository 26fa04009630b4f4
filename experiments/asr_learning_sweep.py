"""How fast does the MoST model learn ASR? Held-out vs train-sentence WER against the number of ASR examples.

A bare training loop (no Lightning) over the same model, prompt format (MOST_SPEC 4), loss and LR schedule as
run.py, sampling tasks by weight from the demo corpus held in memory. Every --eval-every steps it greedy-decodes
--n-eval validation utterances (UNSEEN sentences) and as many train utterances: equal WERs mean the model is not
over-fitting but under-using the audio; a low train WER with a high unseen WER means it memorises sentences.
Made for quick sweeps on a GPU (one process per setting; they share the card), it also runs on the CPU.

    python experiments/asr_learning_sweep.py --device cuda --steps 8000 --mix 1,0,0 --lr 1e-3 --out sweep/base.json
    python experiments/asr_learning_sweep.py --device cuda --model '{"first_k_dense_replace": 4}' --router vanilla
    python experiments/asr_learning_sweep.py --n-train 3000      # fewer distinct sentences: the over-fitting check

Prints one JSON line per evaluation: step, asr_examples, real_tokens, asr_loss (train, last 100 batches),
wer_unseen, wer_train, seconds (training time only).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from most_lightning.data.collate import collate_asr_generation, collate_teacher_forced  # noqa: E402
from most_lightning.data.datamodule import MoSTDataModule  # noqa: E402
from most_lightning.data.samples import BadSamplePolicy, decode_text_sample, iter_records  # noqa: E402
from most_lightning.data.tasks import TASKS, TaskFormatter  # noqa: E402
from most_lightning.eval.asr import TranscriptErrorRates  # noqa: E402
from most_lightning.lit.losses import shifted_token_losses  # noqa: E402
from most_lightning.lit.schedule import linear_warmup_decay  # noqa: E402
from most_lightning.model import MoSTConfig, MoSTForCausalLM, RouterConfig  # noqa: E402

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
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the curve here as JSON")
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


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    dm = MoSTDataModule(data_dir=a.data_dir, corpus=json.loads(a.corpus), verify_audio="none")
    tok = dm.tokenizer
    train, _ = dm.speech_records("train", a.n_train)
    val, _ = dm.speech_records("validation", a.n_eval)
    weights = [float(w) for w in a.mix.split(",")]
    if len(weights) != len(TASKS):
        raise SystemExit(f"--mix needs {len(TASKS)} weights ({','.join(TASKS)}), got {a.mix!r}")
    texts = [r.text for r in iter_records(dm.shards("text"), decode_text_sample, BadSamplePolicy())] \
        if weights[2] > 0 else []
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
        if step % a.eval_every == 0 or step == a.steps:
            point = dict(step=step, asr_examples=n_asr, real_tokens=n_tokens,
                         asr_loss=round(sum(asr_losses[-100:]) / max(len(asr_losses[-100:]), 1), 4),
                         wer_unseen=round(corpus_wer(model, val, fmt, tok, a.device, a.max_new_tokens), 4),
                         wer_train=round(corpus_wer(model, train[: a.n_eval], fmt, tok, a.device, a.max_new_tokens), 4),
                         seconds=round(seconds, 1))
            curve.append(point)
            print(json.dumps(point), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(args=vars(a), curve=curve), indent=2))
    return curve


if __name__ == "__main__":
    main()
