"""Rows of jsonl (optionally gzipped) and parquet files, as dicts, with the line/row number for messages."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Iterator

from .common import Skip

SPLIT_PREFIX = re.compile(r"^(train|test|validation|valid|dev)(?=[-_.]|$)")


def split_of(path: Path, default: str = "train") -> str:
    """'train-00000-of-00009.parquet' -> 'train'; a name without a split prefix -> default."""
    m = SPLIT_PREFIX.match(path.name)
    return m.group(1) if m else default


def iter_rows(path: Path, columns: list[str] | None = None) -> Iterator[tuple[int, dict | Skip]]:
    """(row number from 1, row dict) per row; a malformed row yields a Skip instead of stopping the file.
    `columns` restricts what parquet reads (all must exist); jsonl rows are whole."""
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        n, parquet = 0, pq.ParquetFile(path)
        missing = [c for c in columns or [] if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing}; it has {parquet.schema_arrow.names}")
        for batch in parquet.iter_batches(batch_size=4096, columns=columns):
            for row in batch.to_pylist():
                n += 1
                yield n, row
        return
    if not re.search(r"\.jsonl?(\.gz)?$", name):
        raise ValueError(f"{path}: expected .jsonl, .jsonl.gz, .json (one object per line) or .parquet")
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exn:
                yield n, Skip("bad_index_row", f"{path.name}:{n}: not a JSON line ({exn})")
                continue
            yield n, row if isinstance(row, dict) else Skip("bad_index_row", f"{path.name}:{n}: not an object")
