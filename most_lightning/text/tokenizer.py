"""MoST tokenizer: a byte-level BPE text vocabulary + speech unit tokens + BOS/EOS/begin/end-of-audio.

Every id the model sees comes from the tokens really present in the vocabulary: unit ids and modality marks
are looked up from the token strings, never assumed to be a contiguous range (the reference hard-codes
100002..100503, which breaks with any other tokenizer).

    tok = MoSTTokenizer.train(texts, vocab_size=2000, n_units=500); tok.save(d); tok = MoSTTokenizer.load(d)
    tok = MoSTTokenizer.from_text_tokenizer("deepseek/tokenizer.json", bos_token=..., eos_token=...)  # adds units
    tok = MoSTTokenizer.from_base("DeepSeek-V2-Lite/")  # the same, bos/eos from its tokenizer_config.json
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "most_tokenizer.json"


class MissingSpecialTokensError(ValueError):
    """A tokenizer lacks the BOS/EOS/audio/unit tokens MoST needs."""


class BaseTokenizerError(ValueError):
    """A pretrained base's tokenizer files are missing or do not name its BOS/EOS tokens."""


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": ..., ...}
        return value.get("content")
    return value


@dataclass(frozen=True)
class SpecialTokens:
    bos: str = "<|begin_of_text|>"
    eos: str = "<|end_of_text|>"  # also the padding token
    boa: str = "<|begin_of_audio|>"
    eoa: str = "<|end_of_audio|>"
    unit_format: str = "[Hu{}]"  # the reference's unit token spelling: [Hu0] .. [Hu499]

    def unit(self, i: int) -> str:
        return self.unit_format.format(i)


class MoSTTokenizer:
    def __init__(self, tokenizer: Tokenizer, n_units: int = 500, specials: SpecialTokens | None = None):
        self.tokenizer = tokenizer
        self.specials = specials or SpecialTokens()
        self.n_units = int(n_units)
        # Unit and special tokens never come out of encode_text, even if a transcript spells them out.
        self.tokenizer.encode_special_tokens = True
        sp = self.specials
        needed = [sp.bos, sp.eos, sp.boa, sp.eoa] + [sp.unit(i) for i in range(self.n_units)]
        missing = [t for t in needed if tokenizer.token_to_id(t) is None]
        if missing:
            shown = ", ".join(missing[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6 else "")
            raise MissingSpecialTokensError(
                f"tokenizer lacks MoST tokens: {shown}. Build a MoST tokenizer from a text tokenizer with "
                f"MoSTTokenizer.from_text_tokenizer(path, bos_token=..., eos_token=..., n_units={self.n_units}) "
                "(it adds the begin/end-of-audio and unit tokens), or train one with MoSTTokenizer.train(...).")
        self.bos_id = tokenizer.token_to_id(sp.bos)
        self.eos_id = tokenizer.token_to_id(sp.eos)
        self.pad_id = self.eos_id
        self.boa_id = tokenizer.token_to_id(sp.boa)
        self.eoa_id = tokenizer.token_to_id(sp.eoa)
        self.unit_ids = torch.tensor([tokenizer.token_to_id(sp.unit(i)) for i in range(self.n_units)], dtype=torch.long)
        self._unit_list = self.unit_ids.tolist()
        self._unit_index = {tid: i for i, tid in enumerate(self._unit_list)}
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._non_text_ids = set(self._unit_list) | {self.bos_id, self.eos_id, self.boa_id, self.eoa_id}
        audio = torch.zeros(self.vocab_size, dtype=torch.bool)
        audio[self.unit_ids] = True
        audio[[self.boa_id, self.eoa_id]] = True
        self._audio_mask = audio

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 2000,
        n_units: int = 500,
        specials: SpecialTokens | None = None,
        min_frequency: int = 2,
    ) -> "MoSTTokenizer":
        """Train a byte-level BPE of `vocab_size` text tokens (BOS/EOS included), then add the audio tokens.

        The final `tok.vocab_size` is vocab_size + 2 + n_units (begin/end-of-audio and the units).
        """
        sp = specials or SpecialTokens()
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      special_tokens=[sp.bos, sp.eos],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tk.train_from_iterator(texts, trainer)
        tk.add_special_tokens([sp.boa, sp.eoa] + [sp.unit(i) for i in range(n_units)])
        return cls(tk, n_units, sp)

    @classmethod
    def from_text_tokenizer(
        cls,
        tokenizer: Tokenizer | str | os.PathLike,
        bos_token: str,
        eos_token: str,
        n_units: int = 500,
        boa_token: str = SpecialTokens.boa,
        eoa_token: str = SpecialTokens.eoa,
        unit_format: str = SpecialTokens.unit_format,
    ) -> "MoSTTokenizer":
        """Extend a text tokenizer (a `tokenizer.json` path or a `tokenizers.Tokenizer`) with the tokens it lacks.

        Added tokens get new ids after the existing vocabulary: grow the model's embedding to tok.vocab_size.
        """
        tk = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(os.fspath(tokenizer))
        sp = SpecialTokens(bos_token, eos_token, boa_token, eoa_token, unit_format)
        wanted = [sp.bos, sp.eos, sp.boa, sp.eoa] + [sp.unit(i) for i in range(n_units)]
        tk.add_special_tokens([t for t in wanted if tk.token_to_id(t) is None])
        return cls(tk, n_units, sp)

    @classmethod
    def from_base(cls, path: str | os.PathLike, n_units: int = 500, bos_token: str | None = None,
                  eos_token: str | None = None) -> "MoSTTokenizer":
        """The tokenizer of a pretrained base (a directory with tokenizer.json and tokenizer_config.json naming
        bos/eos, or a tokenizer.json) with MoST's unit and audio tokens appended (``from_text_tokenizer``).

        The model's vocabulary is max(tokenizer, checkpoint rows): DeepSeek-V2-Lite's embedding has 102400 rows
        for ~100k tokens, so the 502 new tokens land in existing (untrained) rows and nothing is resized; a base
        whose embedding is exactly its vocabulary grows by the new rows only (model/checkpoint/vocab.py).
        """
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise BaseTokenizerError(f"{path}: no tokenizer.json (a HF fast-tokenizer file is needed)")
        config_file = file.parent / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        bos = bos_token or _token_text(config.get("bos_token"))
        eos = eos_token or _token_text(config.get("eos_token"))
        if not bos or not eos:
            raise BaseTokenizerError(f"{config_file}: no bos_token/eos_token; pass bos_token=... and eos_token=... "
                                     "(the base's own BOS/EOS strings)")
        return cls.from_text_tokenizer(file, bos_token=bos, eos_token=eos, n_units=n_units)

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(os.fspath(d / TOKENIZER_FILE))
        (d / CONFIG_FILE).write_text(json.dumps({"n_units": self.n_units, **asdict(self.specials)}, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "MoSTTokenizer":
        d = Path(directory)
        if not (d / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{d}: no {TOKENIZER_FILE}; expected a directory written by MoSTTokenizer.save")
        if not (d / CONFIG_FILE).is_file():
            raise MissingSpecialTokensError(
                f"{d} holds a plain text tokenizer ({CONFIG_FILE} is missing), without MoST's begin/end-of-audio "
                "and unit tokens. Convert it once with MoSTTokenizer.from_text_tokenizer("
                f"'{d / TOKENIZER_FILE}', bos_token=..., eos_token=..., n_units=500).save('{d}').")
        cfg = json.loads((d / CONFIG_FILE).read_text())
        n_units = cfg.pop("n_units")
        return cls(Tokenizer.from_file(os.fspath(d / TOKENIZER_FILE)), n_units, SpecialTokens(**cfg))

    # ------------------------------------------------------------------ text
    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode_text(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of `ids`, dropping BOS/EOS/audio/unit ids and ids outside the vocabulary."""
        seq = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        keep = [i for i in seq if 0 <= i < self.vocab_size and i not in self._non_text_ids]
        return self.tokenizer.decode(keep, skip_special_tokens=True)

    # ------------------------------------------------------------------ units
    def encode_units(self, units: Sequence[int] | torch.Tensor) -> list[int]:
        """[boa] + unit token ids + [eoa]."""
        seq = units.tolist() if isinstance(units, torch.Tensor) else list(units)
        if seq and (min(seq) < 0 or max(seq) >= self.n_units):
            bad = next(u for u in seq if not 0 <= u < self.n_units)
            raise ValueError(f"unit {bad} is outside [0, {self.n_units}) (the tokenizer has {self.n_units} unit tokens)")
        return [self.boa_id] + [self._unit_list[u] for u in seq] + [self.eoa_id]

    def decode_units(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        """Unit indices of the unit tokens in `ids` (everything else is ignored)."""
        seq = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return [self._unit_index[i] for i in seq if i in self._unit_index]

    # ------------------------------------------------------------------ modality
    def modality_of(self, ids: torch.Tensor) -> torch.Tensor:
        """1 for unit tokens and begin/end-of-audio, 0 for everything else (text, BOS, EOS = pad, unknown ids)."""
        if self._audio_mask.device != ids.device:
            self._audio_mask = self._audio_mask.to(ids.device)
        inside = (ids >= 0) & (ids < self.vocab_size)
        return (self._audio_mask[ids.clamp(0, self.vocab_size - 1)] & inside).long()

    def is_audio_token(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size and bool(self._audio_mask[token_id])

    def __repr__(self) -> str:
        return (f"MoSTTokenizer(vocab_size={self.vocab_size}, n_units={self.n_units}, bos={self.bos_id}, "
                f"eos=pad={self.eos_id}, boa={self.boa_id}, eoa={self.eoa_id})")


def decode_text_rows(tokenizer, rows: torch.Tensor) -> list[str]:
    """Generated ids -> text, cut at the first eos (an empty string when nothing was generated)."""
    texts = []
    for row in rows.tolist():
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        texts.append(tokenizer.decode_text(row))
    return texts
