"""Why a TTS model does or does not stop: teacher-forced probes of the end-of-audio prediction on held-out TTS
examples, plus counts over the training stream.

For each test TTS example the position whose target is end-of-audio (its INPUT is the last unit, so it is an
audio position) is probed: the probability of end-of-audio there, its rank among all tokens, whether it is the
argmax, the share of that position's routed experts that lie in the audio group (per MoE layer), and the same
probability at the other unit positions (the false-stop rate greedy decoding would face). Over the training
stream: how many TTS examples carry an end-of-audio label, and its share of the loss tokens (its loss weight).

    python experiments/tts_stop_probe.py logs/train/runs/<time> [--ckpt last] [--limit 40] [--train-batches 30]

Prints one JSON object (also written to <run dir>/tts_stop_probe.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def load_run(run_dir: Path, ckpt: str):
    import hydra
    from omegaconf import OmegaConf

    from most_lightning.eval.checkpoint import load_for_eval
    from most_lightning.model.config_groups import audio_expert_ids, build_model_config

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    dm = hydra.utils.instantiate(cfg.data, audio=cfg.get("audio"))
    dm.prepare_data()
    path = run_dir / "checkpoints" / f"{ckpt}.ckpt"
    if not path.is_file():
        path = sorted((run_dir / "checkpoints").glob("*.ckpt"))[-1]
    model, _, _ = load_for_eval(str(path), cfg.model, cfg.router, dm.tokenizer.vocab_size)
    config = build_model_config(cfg.model, cfg.router, dm.tokenizer.vocab_size)
    return cfg, dm, model, set(audio_expert_ids(config))


@torch.no_grad()
def free_running(model, tok, examples, max_new_tokens: int, no_repeat_ngram_size: int = 0) -> dict:
    """Greedy TTS from the prompts (as eval tts does): how many emit end-of-audio, and what the others loop on."""
    from most_lightning.eval.asr import generate_batch
    from most_lightning.eval.context import EvalContext

    ctx = EvalContext(model=model, tokenizer=tok, batch_size=8, progress=False)
    prompts = [ex.input_ids[: ex.labels.index(tok.bos_id)] for ex in examples]
    unit_ids = set(tok.unit_ids.tolist())
    reference = [sum(t in unit_ids for t in ex.labels) for ex in examples]
    in_window = 0
    stopped, lengths, repeats, last_before_end, distinct = 0, [], [], [], []
    for start in range(0, len(prompts), 8):
        new = generate_batch(ctx, prompts[start : start + 8], max_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size)
        for row in new.tolist():
            new_row = list(row)
            if tok.eos_id in row:
                row = row[: row.index(tok.eos_id)]
            if tok.eoa_id in row:
                stopped += 1
                row = row[: row.index(tok.eoa_id)]
            units = tok.decode_units(row)
            ref = reference[len(lengths)]
            in_window += tok.eoa_id in new_row and abs(len(units) - ref) <= 0.3 * ref
            lengths.append(len(units))
            repeats.append(sum(a == b for a, b in zip(units, units[1:])) / max(len(units) - 1, 1))
            distinct.append(len(set(units[len(units) // 2 :])))
    n = len(prompts)
    return {"free_running_n": n, "free_running_stopped": stopped,
            "free_running_mean_units": sum(lengths) / n, "free_running_mean_units_reference": sum(reference) / n,
            "free_running_stop_rate_within_30pct": in_window / n,
            "free_running_immediate_repeat_share": sum(repeats) / n,  # never in the (deduplicated) training units
            "free_running_distinct_units_in_second_half_mean": sum(distinct) / n}


def probe(run_dir: Path, ckpt: str = "last", limit: int = 40, train_batches: int = 30, free_limit: int = 16,
          max_new_tokens: int = 150, no_repeat_ngram_size: int = 0) -> dict:
    from most_lightning.data.tasks import IGNORE_INDEX, TaskFormatter
    from most_lightning.data.samples import decode_speech_sample, iter_shard, BadSamplePolicy
    from most_lightning.audio.units import dedup_units

    cfg, dm, model, audio_experts = load_run(run_dir, ckpt)
    tok = dm.tokenizer
    fmt = TaskFormatter(tok)
    routed: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: routed.append(out.indices.detach()))
             for name, m in model.named_modules() if name.endswith("mlp.gate")]
    policy = BadSamplePolicy("skip")
    examples = []
    for shard in dm.shards("test"):
        for sample in iter_shard(shard, policy):
            rec = decode_speech_sample(sample, tok.n_units, dedup=False)
            units = dedup_units(rec.units) if dm.quality.dedup_units else list(rec.units)
            examples.append(fmt.tts(rec.transcript, units, rec.key))
            if len(examples) >= limit:
                break
        if len(examples) >= limit:
            break
    p_end, ranks, argmax_end, audio_share, p_end_elsewhere, argmax_end_elsewhere = [], [], [], [], [], []
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        modality = tok.modality_of(ids)
        routed.clear()
        logits = model(ids, modality).logits[0].float()
        probs = logits.softmax(-1)
        labels = torch.tensor(ex.labels)
        pos = int((labels == tok.eoa_id).nonzero()[0]) - 1  # the position that must predict end-of-audio
        p_end.append(float(probs[pos, tok.eoa_id]))
        ranks.append(int((probs[pos] > probs[pos, tok.eoa_id]).sum()) + 1)
        argmax_end.append(int(probs[pos].argmax()) == tok.eoa_id)
        boa = int((labels == tok.boa_id).nonzero()[0])
        others = torch.arange(boa, pos)  # unit positions (input BOA or a unit) whose target is a unit
        p_end_elsewhere.append(float(probs[others, tok.eoa_id].mean()))
        argmax_end_elsewhere.append(float((probs[others].argmax(-1) == tok.eoa_id).float().mean()))
        share = [sum(int(e) in audio_experts for e in layer[pos].tolist()) / layer.shape[1] for layer in routed]
        audio_share.append(share)
        assert int(modality[0, pos]) == 1, "the end-of-audio predicting position has an audio input token"
    for h in hooks:
        h.remove()
    free = free_running(model, tok, examples[:free_limit], max_new_tokens, no_repeat_ngram_size) if free_limit else {}
    n = len(examples)
    layers = len(audio_share[0]) if audio_share else 0
    result = {
        "run": str(run_dir), "router": cfg.router.name, "n_examples": n,
        "end_position_input_modality": "audio (the last unit)",
        "end_position_audio_group_share_per_layer": [round(sum(s[i] for s in audio_share) / n, 3)
                                                     for i in range(layers)],
        "p_end_at_end_position_mean": sum(p_end) / n,
        "p_end_at_end_position_median": sorted(p_end)[n // 2],
        "rank_of_end_at_end_position_median": sorted(ranks)[n // 2],
        "end_is_argmax_at_end_position": sum(argmax_end) / n,
        "p_end_at_other_unit_positions_mean": sum(p_end_elsewhere) / n,
        "end_is_argmax_at_other_unit_positions": sum(argmax_end_elsewhere) / n,
    } | free
    # the training stream: is end-of-audio a label in every TTS example, and what share of the loss is it
    n_tts = n_tts_with_end = n_tts_label_tokens = n_end_labels = n_all_label_tokens = 0
    for i, batch in enumerate(dm.train_dataloader()):
        if i >= train_batches:
            break
        n_all_label_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        for labels in tts_example_labels(batch, tok):
            n_tts += 1
            ends = int((labels == tok.eoa_id).sum())
            n_tts_with_end += ends > 0
            n_end_labels += ends
            n_tts_label_tokens += int((labels != IGNORE_INDEX).sum())
    result.update({
        "train_tts_examples": n_tts, "train_tts_examples_with_end_label": n_tts_with_end,
        "end_share_of_tts_loss_tokens": n_end_labels / max(n_tts_label_tokens, 1),
        "end_share_of_all_loss_tokens": n_end_labels / max(n_all_label_tokens, 1),
        "end_loss_weight": float(getattr(cfg.lit, "end_of_audio_weight", 1.0) or 1.0),
    })
    return result


def tts_example_labels(batch: dict, tok) -> list[torch.Tensor]:
    """The labels of each TTS example of a training batch: one per row, or, in packed rows (`segment_ids`), one
    per example whose labels are speech units (a TTS target; ASR and text targets are text)."""
    labels = batch["labels"]
    if "segment_ids" not in batch:
        return [row for row, task in zip(labels, batch["task"]) if task == "tts"]
    units = torch.cat([tok.unit_ids, torch.tensor([tok.eoa_id])])
    out = []
    for row, segments in zip(labels, batch["segment_ids"]):
        for s in segments.unique().tolist():
            example = row[segments == s] if s > 0 else None
            if example is not None and torch.isin(example, units).any():
                out.append(example)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--ckpt", default="last")
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--train-batches", type=int, default=30)
    p.add_argument("--free-running", type=int, default=16, help="greedy TTS on this many test prompts")
    p.add_argument("--max-new-tokens", type=int, default=150)
    p.add_argument("--no-repeat-ngram", type=int, default=0, help="free running: ban repeated n-grams (0 = off)")
    args = p.parse_args()
    torch.set_num_threads(1)
    result = probe(args.run_dir, args.ckpt, args.limit, args.train_batches, args.free_running, args.max_new_tokens,
                   args.no_repeat_ngram)
    text = json.dumps(result, indent=2)
    print(text)
    (args.run_dir / f"tts_stop_probe_{args.ckpt}_nrng{args.no_repeat_ngram}.json").write_text(text)


if __name__ == "__main__":
    main()
