"""Common Voice: `<lang>/{train,dev,test,validated,...}.tsv` + `<lang>/clips/*.mp3`.

Columns as in the release (client_id, path, sentence_id, sentence, ..., up_votes, down_votes, age, gender,
accents, variant, locale, segment); only `path` and `sentence` are required. The mp3 clips (48 or 32 kHz) are
decoded by libsndfile (>= 1.1, mpg123) through soundfile and resampled to 16 kHz. The split is the tsv name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (BadInputs, Skip, SpeechItem, UniqueKeys, check_text, est_flac_bytes, index_files, read_tsv,
                     sample_key)

NAME, KIND = "commonvoice", "speech"
HELP = "Common Voice (*.tsv + clips/*.mp3)"
DEFAULT_TSVS = ("train", "dev", "test")
META_COLUMNS = ("client_id", "sentence_id", "up_votes", "down_votes", "age", "gender", "accents", "variant",
                "locale", "segment")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path,
                   help=f"tsv files, or a language directory (then its {', '.join(DEFAULT_TSVS)}.tsv)")


def tsv_files(paths: list[Path]) -> list[Path]:
    return index_files(paths, DEFAULT_TSVS, "Common Voice")


def plan(args: argparse.Namespace, bad: BadInputs) -> dict[str, list[SpeechItem]]:
    items: dict[str, list[SpeechItem]] = {}
    keys = UniqueKeys()
    for tsv in tsv_files(args.inputs):
        split = bad.split = tsv.stem
        clips = tsv.parent / "clips"
        _, rows = read_tsv(tsv, ("path", "sentence"))
        for n, row in rows:
            where = f"{tsv.name}:{n}"
            if row is None or not row.get("path"):
                bad.skip(where, "bad_index_row", f"{where}: wrong number of columns or no path")
                continue
            key = sample_key(Path(row["path"]).stem)
            try:
                text = check_text(key, row["sentence"])
                keys.check(key, where)
            except Skip as skip:
                bad.skip(key, skip.reason, f"{where}: {skip.detail}")
                continue
            audio = clips / row["path"]
            meta = {"id": row["path"], "speaker": row.get("client_id"), "split": split}
            meta.update({c: row[c] for c in META_COLUMNS if c in row and c != "client_id"})
            items.setdefault(split, []).append(SpeechItem(key=key, audio=str(audio), text=text, meta=meta,
                                                          est_bytes=est_flac_bytes(audio)))
    return items
