"""`python -m most_lightning.data.prepare <source> ...`: one command per corpus (see --help)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from . import SOURCES
from .build import BuildOptions
from .common import BadInputError, BadInputs
from .writer import PlanMismatchError, prepare

DEFAULT_SHARD_SIZE = {"speech": "500", "text": "10000", "chat": "1000"}


def _source_module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m most_lightning.data.prepare",
        description="Turn a corpus in its native layout into WebDataset shards (16 kHz FLAC and/or units, "
                    "transcript, JSON metadata) plus manifest.json. Parallel, resumable (rerun the same command "
                    "after a kill), deterministic. See docs/data_preparation.md.")
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name in SOURCES:
        module = _source_module(name)
        sp = sub.add_parser(name, help=module.HELP, description=(module.__doc__ or "").strip(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.add_argument("--out", required=True, type=Path, help="output directory (shards + manifest.json)")
        sp.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE[module.KIND],
                        help="samples per shard (500) or approximate bytes per shard (64MB, 1GB) "
                             f"(default: {DEFAULT_SHARD_SIZE[module.KIND]})")
        sp.add_argument("--num-workers", type=int, default=os.cpu_count() or 1,
                        help="parallel worker processes (default: all cores)")
        sp.add_argument("--on-bad", choices=("skip", "raise"), default="skip",
                        help="bad inputs: count, log and skip them (default), or stop with an error")
        if module.KIND != "text":
            sp.add_argument("--units", default=None,
                            help="directory of a fitted UnitExtractor: also store units.npy (25 Hz unit ids)")
        if module.KIND == "speech":
            sp.add_argument("--raw-transcripts", action="store_true",
                            help="txt keeps the original transcript (default: normalised; json keeps the original)")
        if module.KIND == "text":
            sp.add_argument("--normalize", action="store_true",
                            help="txt = ASR-style normalised text (lower case, words only); default: as written")
        sp.add_argument("--max-new-shards", type=int, default=None,
                        help="stop after writing this many shards (rerun to continue)")
        sp.add_argument("--overwrite", action="store_true", help="discard an earlier preparation in --out")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def build_options(args: argparse.Namespace, kind: str) -> BuildOptions:
    units = getattr(args, "units", None)
    if units is not None:
        from ...audio.units import UnitExtractor

        UnitExtractor.load(units)  # fail now, not in every worker
        units = str(Path(units).resolve())
    tts = getattr(args, "tts", None)
    if tts and tts.lower() == "none":
        tts = None
    if kind == "chat" and units and not tts:
        raise ValueError("--units needs speech: chat turns get units only when voiced, so also pass --tts flite")
    if tts:
        from .tts import get_tts

        get_tts(tts)  # flite on PATH, voices exist
    roles = tuple(r for r in getattr(args, "speak_roles", "user,assistant").split(",") if r)
    if set(roles) - {"system", "user", "assistant"}:
        raise ValueError(f"--speak-roles {roles}: roles are system, user, assistant")
    normalize = not args.raw_transcripts if kind == "speech" else bool(getattr(args, "normalize", False))
    return BuildOptions(source=args.source, units=units, normalize_text=normalize, tts=tts,
                        speak_roles=roles,
                        max_speak_chars=getattr(args, "max_speak_chars", 600))


def run(argv: list[str] | None = None) -> dict | None:
    """Parse argv and prepare; returns the manifest (None when stopped by --max-new-shards). Raises on errors."""
    args = build_parser().parse_args(argv)
    module = _source_module(args.source)
    if getattr(args, "tts", None) and args.tts.lower() == "none":
        args.tts = None
    args.out.mkdir(parents=True, exist_ok=True)
    bad = BadInputs(args.on_bad)
    build = build_options(args, module.KIND)
    items = module.plan(args, bad)
    info = {"inputs": [str(p) for p in getattr(args, "inputs", [])]}
    return prepare(args.source, module.KIND, items, bad, build, args.out, args.shard_size,
                   max(1, args.num_workers), progress=not args.no_progress and sys.stderr.isatty(),
                   max_new_shards=args.max_new_shards, overwrite=args.overwrite, info=info)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        manifest = run(argv)
    except (BadInputError, PlanMismatchError, FileNotFoundError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    if manifest is None:
        return 0
    for split, entry in manifest["splits"].items():
        print(f"{split:>12}: {entry['samples']} samples, {entry['hours']:.3f} h, {len(entry['shards'])} shards")
    bad = manifest["bad_inputs"]
    if bad["skipped"] or bad["fixed"]:
        print(f"bad inputs: skipped {bad['skipped']}, fixed {bad['fixed']} (details: {bad['list']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
