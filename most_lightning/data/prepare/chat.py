"""Chat corpora: SmolTalk-style rows with a `messages` list of {"role", "content"} (jsonl/.gz or parquet),
optionally voiced turn by turn with a pluggable TTS (--tts flite).

Sample members: `json` (source, split, n_turns, ...), `messages.json` = [{"role", "text", "audio", "units"}]
with `audio` = "turn{i}.flac" / `units` = "turn{i}.units.npy" for spoken turns (i = index in messages), else
null. A chat with an empty turn or an unknown role is a bad input (skipped and counted, or an error).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import FLAC_BYTES_PER_SECOND, BadInputs, ChatItem, Skip, UniqueKeys, check_text, sample_key
from .rows import iter_rows, split_of

NAME, KIND = "chat", "chat"
HELP = "chat dialogues (SmolTalk-style `messages`), optionally rendered as speech with a TTS"
ROLES = ("system", "user", "assistant")
CHARS_PER_SECOND = 14.0  # flite's speaking rate, for planning shards by size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, help=".jsonl, .jsonl.gz or .parquet files")
    p.add_argument("--messages-field", default="messages", help="column/key with the list of turns")
    p.add_argument("--split", default=None, help="split name (default: from the file name, else 'train')")
    add_speech_arguments(p)


def add_speech_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tts", default=None,
                   help="voice the turns with this TTS: 'flite', 'flite:slt,awb' or 'package.module:factory' "
                        "(default: text only)")
    p.add_argument("--speak-roles", default="user,assistant", help="comma-separated roles whose turns are voiced")
    p.add_argument("--max-speak-chars", type=int, default=600,
                   help="longer turns stay text-only (counted as fixed.not_spoken_too_long)")


def parse_messages(raw) -> list[dict[str, str]]:
    """SmolTalk turns -> [{"role", "text"}]; Skip on a malformed list, an unknown role or an empty turn."""
    if not isinstance(raw, list) or not raw:
        raise Skip("bad_index_row", f"messages is {type(raw).__name__}, not a non-empty list")
    out = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise Skip("bad_index_row", f"turn {i} is {type(turn).__name__}, not an object")
        role = turn.get("role")
        if role not in ROLES:
            raise Skip("bad_role", f"turn {i} has role {role!r}, not one of {ROLES}")
        content = turn.get("content", turn.get("text"))
        try:
            text = check_text("", "" if content is None else content, empty_reason="empty_turn")
        except Skip as skip:
            raise Skip(skip.reason, f"turn {i} ({role}): {skip.detail}") from None
        out.append({"role": role, "text": text})
    return out


def est_bytes(messages: list[dict[str, str]], speak_roles: tuple[str, ...] | None) -> int:
    size = sum(len(m["text"].encode()) for m in messages) + 300
    if speak_roles:
        spoken = sum(len(m["text"]) for m in messages if m["role"] in speak_roles)
        size += int(spoken / CHARS_PER_SECOND * FLAC_BYTES_PER_SECOND)
    return size


def plan(args: argparse.Namespace, bad: BadInputs) -> dict[str, list[ChatItem]]:
    items: dict[str, list[ChatItem]] = {}
    keys = UniqueKeys()
    speak = tuple(r for r in args.speak_roles.split(",") if r) if args.tts else None
    for path in args.inputs:
        split = bad.split = args.split or split_of(path)
        for n, row in iter_rows(path):
            key = sample_key(f"{path.name.split('.')[0]}_{n:08d}")
            try:
                if isinstance(row, Skip):
                    raise row
                if args.messages_field not in row:
                    raise Skip("bad_index_row", f"no field {args.messages_field!r} (has {sorted(row)})")
                messages = parse_messages(row[args.messages_field])
                keys.check(key, f"{path}:{n}")
            except Skip as skip:
                bad.skip(key, skip.reason, f"{path.name}:{n}: {skip.detail}")
                continue
            meta = {"id": f"{path.name}:{n}", "split": split}
            if isinstance(row.get("source"), str):
                meta["origin"] = row["source"]  # SmolTalk's sub-dataset name
            items.setdefault(split, []).append(ChatItem(key, messages, meta, est_bytes(messages, speak)))
    return items
