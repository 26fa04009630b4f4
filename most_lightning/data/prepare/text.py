"""Text corpora: jsonl (optionally .gz) or parquet with one document per row in a text field.

RefinedWeb: `--text-field content` (its parquet files also have url, timestamp, dump, segment, image_urls).
Samples are `txt` + `json`; the text is kept as written unless --normalize (the demo corpus's ASR-style
normalisation). The plan holds the texts in memory: prepare a huge corpus in groups of files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import BadInputs, Skip, TextItem, UniqueKeys, check_text, sample_key
from .rows import iter_rows, split_of

NAME, KIND = "text", "text"
HELP = "text documents from jsonl / parquet (e.g. RefinedWeb with --text-field content)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, help=".jsonl, .jsonl.gz or .parquet files")
    p.add_argument("--text-field", default="text", help="column/key holding the document (RefinedWeb: content)")
    p.add_argument("--meta-fields", default="", help="comma-separated fields copied into the json metadata")
    p.add_argument("--split", default=None, help="split name (default: from the file name, else 'train')")


def plan(args: argparse.Namespace, bad: BadInputs) -> dict[str, list[TextItem]]:
    items: dict[str, list[TextItem]] = {}
    keys = UniqueKeys()
    meta_fields = [f for f in args.meta_fields.split(",") if f]
    for path in args.inputs:
        split = bad.split = args.split or split_of(path)
        for n, row in iter_rows(path, [args.text_field, *meta_fields]):
            key = sample_key(f"{path.name.split('.')[0]}_{n:08d}")
            try:
                if isinstance(row, Skip):
                    raise row
                if args.text_field not in row:
                    raise Skip("bad_index_row", f"no field {args.text_field!r} (has {sorted(row)}); "
                                                "set --text-field")
                text = check_text(key, row[args.text_field], empty_reason="empty_text")
                keys.check(key, f"{path}:{n}")
            except Skip as skip:
                bad.skip(key, skip.reason, f"{path.name}:{n}: {skip.detail}")
                continue
            meta = {"id": f"{path.name}:{n}", "split": split,
                    **{f: row[f] if isinstance(row.get(f), (str, int, float, bool, type(None))) else str(row[f])
                       for f in meta_fields if f in row}}
            items.setdefault(split, []).append(TextItem(key, text, meta, est_bytes=len(text.encode()) + 200))
    return items
