"""Bridges from a Hugging Face tokenizer to what the id-only engine needs."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and type(decoder).__name__ == "ByteLevel"


def token_id(tokenizer: Any, token: str) -> int | None:
    """The id of the vocabulary entry `token` (added tokens included), None when absent.

    A fast tokenizer looks it up in its backend; `get_vocab()` would copy the whole
    vocabulary into a dict (~0.2 s for Qwen's 151k tokens), once per call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.token_to_id(token)
    return tokenizer.get_vocab().get(token)


def token_bytes_table(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """The bytes each id stands for, for ids `0 … vocab_size-1` (b"" past the tokenizer).

    Byte-level BPE tokens map back to their exact bytes (a token may hold half of a
    UTF-8 character); added tokens are their text; other tokenizers fall back to
    decoding each id on its own.
    """
    table = [b""] * vocab_size
    added = {int(i): t.content for i, t in tokenizer.added_tokens_decoder.items()}
    byte_level = _is_byte_level(tokenizer)
    decoder = _byte_decoder()
    for token, token_id in tokenizer.get_vocab().items():
        if token_id >= vocab_size:
            continue
        if token_id in added:
            table[token_id] = added[token_id].encode("utf-8")
        elif byte_level and all(ch in decoder for ch in token):
            table[token_id] = bytes(decoder[ch] for ch in token)
        else:
            table[token_id] = tokenizer.decode([token_id]).encode("utf-8")
    return table
