"""The MoST tokenizer of a pretrained base: its own tokenizer.json + MoST's unit and audio tokens appended.

    tok = most_tokenizer_from_base("DeepSeek-V2-Lite/")          # bos/eos from tokenizer_config.json
    model, _ = load_pretrained("DeepSeek-V2-Lite/", vocab_size=tok.vocab_size, router=...)

Tokens the base lacks get the next free ids (MoSTTokenizer.from_text_tokenizer); the modality marks come from
those ids. The model's vocabulary is max(tokenizer, checkpoint rows): DeepSeek-V2-Lite's embedding has 102400
rows for ~100k tokens, so the 502 new tokens land in existing (untrained) rows and nothing is resized; a base
whose embedding is exactly its vocabulary grows by the new rows only, initialised as vocab.py says.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from most_lightning.model.checkpoint.files import CheckpointError
from most_lightning.text.tokenizer import MoSTTokenizer


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": ..., ...}
        return value.get("content")
    return value


def most_tokenizer_from_base(path: str | os.PathLike, n_units: int = 500, bos_token: str | None = None,
                             eos_token: str | None = None) -> MoSTTokenizer:
    """``path``: a directory with tokenizer.json (and tokenizer_config.json naming bos/eos), or a tokenizer.json."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{path}: no tokenizer.json (a HF fast-tokenizer file is needed)")
    config_file = file.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    bos = bos_token or _token_text(config.get("bos_token"))
    eos = eos_token or _token_text(config.get("eos_token"))
    if not bos or not eos:
        raise CheckpointError(f"{config_file}: no bos_token/eos_token; pass bos_token=... and eos_token=... (the "
                              "base's own BOS/EOS strings)")
    return MoSTTokenizer.from_text_tokenizer(file, bos_token=bos, eos_token=eos, n_units=n_units)
