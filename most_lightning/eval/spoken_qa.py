"""Spoken question answering: a question as audio -> the model answers in text (S->T) and in speech (S->S,
vocoded and transcribed by the external recogniser) -> exact-match and contains-answer accuracy.

Question files (json list or jsonl), one item per question, in any of these styles:
  Llama Questions   {"Questions": "...", "Answer": "...", "audio": "wavs/1.wav"}
  TriviaQA          {"question": "...", "answer": {"value": "...", "aliases": ["...", ...]}}
  WebQuestions      {"question"/"utterance": "...", "answers": ["...", ...]}
`audio` (optional) is a path relative to the file; questions without it are voiced with flite when
`voice_missing` is true, else skipped and counted, as are questions without any answer.

Matching (after the answer normaliser: the suite's normaliser with articles removed, SQuAD style, unless
`normalizer` is given): exact = the prediction equals one of the answers; contains = one of the answers
occurs in the prediction as whole words. An empty prediction matches nothing.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from most_lightning.audio.io import AudioDecodeError, read_audio
from most_lightning.eval.asr import generate_batch
from most_lightning.metrics.normalize import TextNormalizer
from most_lightning.metrics.scores import contains_answer, exact_match
from most_lightning.text.tokenizer import decode_text_rows

log = logging.getLogger(__name__)


@dataclass
class Question:
    key: str
    text: str
    answers: list[str]
    audio: Path | None


def _answers(item: Mapping[str, Any]) -> list[str]:
    raw = item.get("answers", item.get("answer", item.get("Answer")))
    if isinstance(raw, Mapping):  # TriviaQA
        values = [raw.get("value")] + list(raw.get("aliases") or [])
    elif isinstance(raw, (list, tuple)):
        values = list(raw)
    else:
        values = [raw]
    return [str(v) for v in values if v is not None and str(v).strip()]


def read_questions(path: str | Path) -> tuple[list[Question], int]:
    """(questions, number skipped for having no question text or no answer)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"spoken QA file {p}: no such file (json list or jsonl, one question per item)")
    text = p.read_text(encoding="utf-8").strip()
    items = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    out, skipped = [], 0
    for i, item in enumerate(items):
        question = item.get("question", item.get("Questions", item.get("utterance")))
        answers = _answers(item)
        if not question or not answers:
            skipped += 1
            log.warning(f"{p}: item {i} has no question text or no answer: skipped")
            continue
        audio = item.get("audio") or item.get("audio_path")
        out.append(Question(str(item.get("id", item.get("question_id", i))), str(question), answers,
                            (p.parent / audio) if audio else None))
    return out, skipped


def _question_audio(q: Question, voice_dir: Path, voice_missing: bool, voice: str) -> torch.Tensor | None:
    path = q.audio
    if path is None:
        if not voice_missing:
            return None
        from most_lightning.data.flite import flite_binary

        voice_dir.mkdir(parents=True, exist_ok=True)
        path = voice_dir / (re.sub(r"[^\w.-]+", "_", q.key) + ".wav")
        subprocess.run([flite_binary(), "-voice", voice, "-t", q.text, "-o", str(path)], check=True,
                       capture_output=True)
    try:
        return read_audio(str(path))[0]
    except (AudioDecodeError, FileNotFoundError) as err:
        log.warning(f"question {q.key}: {err}")
        return None


def _prompt(ctx, instruction: str, units: list[int]) -> list[int]:
    t = ctx.tokenizer
    return ([t.bos_id] + t.encode_text(instruction + "\n\n") + t.encode_units(units) + [t.eos_id]
            + t.encode_text("\n\nOutput: "))


def evaluate_spoken_qa(ctx, *, sets: Mapping[str, Mapping[str, Any]], limit: int | None, modes: Sequence[str],
                       max_new_tokens: int, max_new_units: int, s2t_instruction: str, s2s_instruction: str,
                       voice_missing: bool, voice: str, vocoder: Mapping[str, Any], recognizer: Mapping[str, Any] | str,
                       normalizer: Mapping[str, Any] | None, n_examples: int) -> dict:
    bad = [m for m in modes if m not in ("s2t", "s2s")]
    if bad:
        raise ValueError(f"spoken_qa.modes has {bad}; allowed: s2t, s2s")
    norm = TextNormalizer.from_any(normalizer) if normalizer else TextNormalizer(
        **{**ctx.normalizer.__dict__, "remove_articles": True})
    metrics: dict[str, Any] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    for name, spec in sets.items():
        if not spec or not spec.get("path"):
            raise ValueError(f"spoken_qa.sets.{name}: give path=<question file>")
        questions, n_bad = read_questions(spec["path"])
        questions = questions[:limit] if limit is not None else questions
        usable = []
        for q in questions:
            wave = _question_audio(q, ctx.output_dir / "qa_audio" / name, voice_missing, voice)
            if wave is None or wave.numel() == 0:
                n_bad += 1
                continue
            usable.append((q, ctx.audio_to_units(wave)))
        metrics[f"{name}_n_questions"], metrics[f"{name}_n_skipped"] = len(usable), n_bad
        if not usable:
            continue
        predictions: dict[str, list[str]] = {}
        if "s2t" in modes:
            predictions["s2t"] = []
            for chunk in ctx.batches(usable, f"{name} s2t"):
                new = generate_batch(ctx, [_prompt(ctx, s2t_instruction, u) for _, u in chunk], max_new_tokens)
                predictions["s2t"] += decode_text_rows(ctx.tokenizer, new)
        if "s2s" in modes:
            from most_lightning.eval.tts import build_vocoder, get_recognizer

            if "qa_vocoder" not in ctx.cache:
                ctx.cache["qa_vocoder"] = build_vocoder(ctx, "qa", vocoder)
            vocode = ctx.cache["qa_vocoder"]
            waves = []
            for chunk in ctx.batches(usable, f"{name} s2s"):
                new = generate_batch(ctx, [_prompt(ctx, s2s_instruction, u) for _, u in chunk], max_new_units)
                for row in new.tolist():
                    if ctx.tokenizer.eos_id in row:
                        row = row[: row.index(ctx.tokenizer.eos_id)]
                    units = ctx.tokenizer.decode_units(row)
                    waves.append(vocode(units) if units else torch.zeros(0))
            predictions["s2s"] = get_recognizer(ctx, recognizer).transcribe(waves)
        for mode, preds in predictions.items():
            answers = [q.answers for q, _ in usable]
            metrics[f"{name}_{mode}_exact"] = sum(exact_match(p, a, norm) for p, a in zip(preds, answers)) / len(preds)
            metrics[f"{name}_{mode}_contains"] = sum(
                contains_answer(p, a, norm) for p, a in zip(preds, answers)) / len(preds)
            metrics[f"{name}_{mode}_n_empty"] = sum(not norm(p) for p in preds)
            examples[f"{name}_{mode}"] = [{"question": q.text, "answers": q.answers[:5], "prediction": p}
                                          for (q, _), p in zip(usable, preds)][:n_examples]
    return {"metrics": metrics, "examples": examples,
            "settings": {"sets": {k: dict(v) for k, v in sets.items()}, "modes": list(modes), "limit": limit}}
