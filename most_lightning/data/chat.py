"""Chat sample schema and decoding (instruction data for stage 2).

One WebDataset sample per dialogue:
    json            metadata: {"source": ..., "split": ..., "n_turns": ...}
    messages.json   [{"role": "system"|"user"|"assistant", "text": str, "audio": member|null, "units": member|null}]
    turn{i}.flac    16 kHz mono audio of turn i (when voiced)
    turn{i}.units.npy  int16 unit ids of turn i (not deduplicated)
A turn's `audio`/`units` name the member (e.g. "turn1.flac", "turn1.units.npy"). Nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .samples import (BadChatError, EmptyTurnError, MissingMemberError, VerifyAudio, _member, _meta, check_audio,
                      read_units)

MESSAGES_MEMBER = "messages.json"
ROLES = ("system", "user", "assistant")


@dataclass
class ChatTurn:
    role: str
    text: str
    units: list[int] | None = None  # present when the turn was voiced (and units were asked for)


@dataclass
class ChatRecord:
    key: str
    shard: str
    turns: list[ChatTurn]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_speech(self) -> bool:
        return any(t.units for t in self.turns)


def decode_chat_sample(sample: dict, n_units: int, dedup: bool = True,
                       verify_audio: VerifyAudio = "none") -> ChatRecord:
    """Validate and decode one raw chat sample. Raises BadSampleError subclasses naming key and shard."""
    key, shard = sample.get("__key__", "?"), sample.get("__url__", "?")
    meta = _meta(sample, key, shard)
    raw = _member(sample, MESSAGES_MEMBER, key, shard)
    try:
        messages = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exn:
        raise BadChatError(key, shard, f"{MESSAGES_MEMBER} is not JSON ({exn})") from exn
    if not isinstance(messages, list) or not messages:
        raise BadChatError(key, shard, f"{MESSAGES_MEMBER} must be a non-empty list of turns")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("text"), str):
            raise BadChatError(key, shard, f"turn {i} must be {{'role': one of {ROLES}, 'text': str, ...}}, got {m!r:.80}")
        if not m["text"].strip():
            raise EmptyTurnError(key, shard, f"turn {i} ({m['role']}) has empty text")
        units = None
        if m.get("units"):
            units = read_units(_member(sample, m["units"], key, shard), n_units, key, shard, m["units"], dedup)
        if m.get("audio"):
            if m["audio"] not in sample:
                raise MissingMemberError(key, shard, f"turn {i} names audio member {m['audio']!r}, which is missing")
            if verify_audio != "none":
                check_audio(sample[m["audio"]], key, shard, verify_audio, member=m["audio"])
        turns.append(ChatTurn(m["role"], m["text"].strip(), units))
    if not any(t.role == "assistant" for t in turns):
        raise BadChatError(key, shard, "no assistant turn: nothing to learn from")
    return ChatRecord(key, shard, turns, meta)
