"""A token's own bytes, for the ``bytes`` field of OpenAI's chat logprobs.

Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) and SentencePiece byte fallback (Llama 2,
Mistral) split a multi-byte UTF-8 character across tokens. Decoding such a token alone gives
U+FFFD, so ``decode(token).encode()`` reports the replacement character's bytes [239, 191, 189]
instead of the byte(s) the token stands for. Here the bytes come from the token's vocabulary
spelling instead, which is exact for those two schemes; any other tokenizer has no sub-character
tokens we know how to read, and falls back to its decoded text.

What holds: for the first two schemes, the concatenated bytes of a sequence's tokens are the
bytes of the decoded sequence (special tokens spelled as their text). The ``token`` string is
the bytes as text when they are valid UTF-8, else OpenAI's form for a partial character:
``"bytes:\\xe4\\xbd"`` (printable ASCII kept, every other byte escaped).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level spelling, inverted: the char a byte is written as -> the byte.
    Printable Latin-1 bytes spell themselves; the rest take chars from U+0100 upward, in
    byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_alphabet()


def _decoder_types(tokenizer: Any) -> set[str]:
    """The types of a fast tokenizer's decoder (its steps, for a ``Sequence``); empty for a
    slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    steps = decoder.get("decoders") if decoder.get("type") == "Sequence" else [decoder]
    return {step.get("type") for step in steps or [] if isinstance(step, dict)}


def display(raw: bytes) -> str:
    """OpenAI's ``token`` string for ``raw``: the text, or ``bytes:\\xNN...`` when ``raw`` is
    not valid UTF-8 (part of a character)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(
            chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw
        )


class TokenBytes:
    """``bytes_of(token_id)``: the bytes a token stands for, cached per id."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        types = _decoder_types(tokenizer)
        self.scheme = (
            "byte_level"
            if "ByteLevel" in types
            else "byte_fallback"
            if "ByteFallback" in types
            else "text"
        )
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._added = {int(i): str(getattr(t, "content", t)) for i, t in added.items()}
        self._cache: dict[int, bytes] = {}  # at most one entry per vocabulary id

    def bytes_of(self, token_id: int) -> bytes:
        raw = self._cache.get(token_id)
        if raw is None:
            raw = self._cache[token_id] = self._lookup(token_id)
        return raw

    def _lookup(self, token_id: int) -> bytes:
        if token_id in self._added:  # special/added tokens are stored as their text
            return self._added[token_id].encode()
        if self.scheme != "text":
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str):
                raw = self._from_piece(piece)
                if raw is not None:
                    return raw
        return self._tokenizer.decode([token_id]).encode()

    def _from_piece(self, piece: str) -> bytes | None:
        if self.scheme == "byte_level":
            if all(c in _BYTE_LEVEL for c in piece):
                return bytes(_BYTE_LEVEL[c] for c in piece)
            return None
        m = _BYTE_FALLBACK.fullmatch(piece)
        return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()

    def entry(self, token_id: int) -> tuple[str, list[int]]:
        """OpenAI's ``token`` and ``bytes`` for ``token_id``."""
        raw = self.bytes_of(token_id)
        return display(raw), list(raw)


@functools.lru_cache(maxsize=8)
def token_bytes(tokenizer: Any) -> TokenBytes:
    """One :class:`TokenBytes` per tokenizer (the server holds one for its life)."""
    return TokenBytes(tokenizer)
