"""VoxPopuli transcribed data: `<root>/<lang>/asr_{train,dev,test}.tsv` + `<root>/<lang>/<year>/<id>.ogg`.

The layout its get_asr_data.py writes (year = the first 4 characters of the id); `.wav` next to the ogg works
too. tsv columns: id, raw_text, normalized_text, speaker_id, split, gender, is_gold_transcript, accent. The
transcript is raw_text (cased, punctuated), normalized_text when raw_text is empty.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (BadInputs, Skip, SpeechItem, UniqueKeys, check_text, est_flac_bytes, index_files, read_tsv,
                     sample_key)

NAME, KIND = "voxpopuli", "speech"
HELP = "VoxPopuli (asr_*.tsv + <year>/<id>.ogg)"
DEFAULT_TSVS = ("asr_train", "asr_dev", "asr_test")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path,
                   help="asr_*.tsv files, or a language directory (then its asr_train/dev/test.tsv)")


def tsv_files(paths: list[Path]) -> list[Path]:
    return index_files(paths, DEFAULT_TSVS, "VoxPopuli")


def audio_path(lang_dir: Path, utt_id: str) -> Path:
    ogg = lang_dir / utt_id[:4] / f"{utt_id}.ogg"
    wav = ogg.with_suffix(".wav")
    return wav if not ogg.exists() and wav.exists() else ogg


def plan(args: argparse.Namespace, bad: BadInputs) -> dict[str, list[SpeechItem]]:
    items: dict[str, list[SpeechItem]] = {}
    keys = UniqueKeys()
    for tsv in tsv_files(args.inputs):
        split = bad.split = tsv.stem.removeprefix("asr_")
        _, rows = read_tsv(tsv, ("id", "raw_text", "normalized_text", "speaker_id"))
        for n, row in rows:
            where = f"{tsv.name}:{n}"
            if row is None or not row.get("id"):
                bad.skip(where, "bad_index_row", f"{where}: wrong number of columns or no id")
                continue
            key = sample_key(row["id"])
            try:
                text = check_text(key, row["raw_text"] if row["raw_text"].strip() else row["normalized_text"])
                keys.check(key, where)
            except Skip as skip:
                bad.skip(key, skip.reason, f"{where}: {skip.detail}")
                continue
            audio = audio_path(tsv.parent, row["id"])
            meta = {"id": row["id"], "speaker": row["speaker_id"], "split": split,
                    "normalized_text": row["normalized_text"]}
            meta.update({c: row[c] for c in ("gender", "is_gold_transcript", "accent") if c in row})
            items.setdefault(split, []).append(SpeechItem(key=key, audio=str(audio), text=text, meta=meta,
                                                          est_bytes=est_flac_bytes(audio)))
    return items
