"""Text normalisation applied to hypotheses AND references before WER/CER or answer matching.

Default (the protocol behind the published LibriSpeech numbers, docs/model_spec.md section 6): NFKC, lower-case,
punctuation stripped (apostrophes inside words kept: "don't" stays one word), whitespace collapsed.
Switches:
  lowercase          false keeps case
  strip_punctuation  false keeps punctuation
  numbers            'keep' (default) | 'words' (digits -> English words: "21" -> "twenty one")
  remove_articles    drop a/an/the (the SQuAD-style answer normaliser used for spoken QA)
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, fields
from typing import Any, Mapping

_PUNCTUATION = re.compile(r"[^\w\s']|_")
_QUOTES = re.compile(r"(^|\s)'+|'+(?=\s|$)")
_SPACES = re.compile(r"\s+")
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
NUMBER_MODES = ("keep", "words")


def integer_to_words(n: int) -> str:
    """0..10^15-1 in English words without 'and' or hyphens: 1905 -> 'one thousand nine hundred five'."""
    if n < 0:
        return "minus " + integer_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + integer_to_words(n % 100))
    for value, name in _SCALES:
        if n >= value:
            head, rest = divmod(n, value)
            return integer_to_words(head) + " " + name + ("" if rest == 0 else " " + integer_to_words(rest))
    raise AssertionError("unreachable")


def _number_to_words(match: re.Match) -> str:
    text = match.group(0)
    if "." in text and text.count(".") == 1 and "," not in text:  # decimal: 3.14 -> three point one four
        whole, frac = text.split(".")
        return integer_to_words(int(whole)) + " point " + " ".join(_ONES[int(d)] for d in frac)
    digits = text.replace(",", "").replace(".", "")
    return integer_to_words(int(digits))


@dataclass(frozen=True)
class TextNormalizer:
    lowercase: bool = True
    strip_punctuation: bool = True
    numbers: str = "keep"
    remove_articles: bool = False

    def __post_init__(self):
        if self.numbers not in NUMBER_MODES:
            raise ValueError(f"normalizer.numbers={self.numbers!r}: allowed values are {NUMBER_MODES}")

    @classmethod
    def from_any(cls, value: "TextNormalizer | Mapping[str, Any] | None") -> "TextNormalizer":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown normalizer option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(value))

    def __call__(self, text: str) -> str:
        text = unicodedata.normalize("NFKC", text)
        if self.numbers == "words":
            text = _NUMBER.sub(lambda m: " " + _number_to_words(m) + " ", text)
        if self.lowercase:
            text = text.lower()
        if self.strip_punctuation:
            text = _PUNCTUATION.sub(" ", text)
            text = _QUOTES.sub(r"\1 ", text)  # quote marks, not apostrophes inside words
        if self.remove_articles:
            text = _ARTICLES.sub(" ", text)
        return _SPACES.sub(" ", text).strip()


DEFAULT_NORMALIZER = TextNormalizer()
