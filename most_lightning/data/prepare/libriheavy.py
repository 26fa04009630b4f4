"""LibriHeavy: lhotse cut manifests `libriheavy_cuts_<subset>.jsonl.gz` (one MonoCut per line).

Transcript: the supervision's original text (`custom.texts[0]`, cased and punctuated; `text` when a manifest
has no custom texts). Audio: the recording's first `file` source, a path relative to --audio-root (LibriHeavy's
are `download/librilight/...`), read from cut.start for cut.duration seconds. The split is the subset name.
The jsonl is read directly (no lhotse needed).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

from .common import FLAC_BYTES_PER_SECOND, BadInputs, Skip, SpeechItem, UniqueKeys, check_text, sample_key

NAME, KIND = "libriheavy", "speech"
HELP = "LibriHeavy lhotse cuts manifests (libriheavy_cuts_*.jsonl.gz)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifests", nargs="+", type=Path, help="libriheavy_cuts_<subset>.jsonl.gz files")
    p.add_argument("--audio-root", type=Path, default=Path("."),
                   help="directory the recordings' source paths are relative to (default: current directory)")


def split_name(path: Path) -> str:
    name = re.sub(r"\.jsonl(\.gz)?$", "", path.name)
    return re.sub(r"^libriheavy_cuts_", "", name)


def cut_item(cut: dict, audio_root: Path, split: str) -> SpeechItem:
    """Raises Skip (bad_index_row, unsupported_source, empty/non-UTF-8 transcript)."""
    try:
        sup = cut["supervisions"][0]
        recording = cut["recording"]
        start, duration = float(cut["start"]), float(cut["duration"])
    except (KeyError, IndexError, TypeError, ValueError) as exn:
        raise Skip("bad_index_row", f"cut lacks {exn} (needs start, duration, supervisions[0], recording)")
    texts = (sup.get("custom") or {}).get("texts")
    text = check_text(cut["id"], texts[0] if texts else sup.get("text"))
    files = [s for s in recording.get("sources", []) if s.get("type") == "file"]
    if not files:
        raise Skip("unsupported_source", f"recording {recording.get('id')} has no 'file' source "
                                         f"({[s.get('type') for s in recording.get('sources', [])]})")
    path = Path(files[0]["source"])
    return SpeechItem(key=sample_key(cut["id"]), audio=str(path if path.is_absolute() else audio_root / path),
                      text=text, start=start, duration=duration,
                      meta={"id": cut["id"], "speaker": sup.get("speaker"), "split": split,
                            "recording": recording.get("id"), "start": start},
                      est_bytes=int(duration * FLAC_BYTES_PER_SECOND))


def plan(args: argparse.Namespace, bad: BadInputs) -> dict[str, list[SpeechItem]]:
    items: dict[str, list[SpeechItem]] = {}
    keys = UniqueKeys()
    for manifest in args.manifests:
        if not manifest.is_file():
            raise FileNotFoundError(f"LibriHeavy manifest {manifest} does not exist")
        split = bad.split = split_name(manifest)
        opener = gzip.open if manifest.name.endswith(".gz") else open
        with opener(manifest, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{manifest.name}:{n}"
                try:
                    cut = json.loads(line)
                    if not isinstance(cut, dict) or "id" not in cut:
                        raise Skip("bad_index_row", "not a cut object with an 'id'")
                except (ValueError, UnicodeDecodeError) as exn:
                    bad.skip(where, "bad_index_row", f"not JSON ({exn})")
                    continue
                except Skip as skip:
                    bad.skip(where, skip.reason, skip.detail)
                    continue
                try:
                    item = cut_item(cut, args.audio_root, split)
                    keys.check(item.key, where)
                except Skip as skip:
                    bad.skip(sample_key(str(cut["id"])), skip.reason, f"{where}: {skip.detail}")
                    continue
                items.setdefault(split, []).append(item)
    return items
