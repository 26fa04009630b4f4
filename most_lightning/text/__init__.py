"""Text side: the MoST tokenizer (byte-level BPE + speech unit tokens + special tokens, modality marks)."""

from .tokenizer import BaseTokenizerError, MissingSpecialTokensError, MoSTTokenizer, SpecialTokens

__all__ = ["BaseTokenizerError", "MissingSpecialTokensError", "MoSTTokenizer", "SpecialTokens"]
