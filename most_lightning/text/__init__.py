"""Text side: the MoST tokenizer (byte-level BPE + speech unit tokens + special tokens, modality marks)."""

from .tokenizer import MissingSpecialTokensError, MoSTTokenizer, SpecialTokens

__all__ = ["MissingSpecialTokensError", "MoSTTokenizer", "SpecialTokens"]
