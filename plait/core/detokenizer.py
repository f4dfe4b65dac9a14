"""Incremental detokenization and stop-string matching.

Decoding the whole output every step is quadratic and, worse, a token that completes a
multi-byte character would make earlier text change. We keep two offsets like vLLM/TGI: text is
only released once the decoded window no longer ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.kwargs = {
            "skip_special_tokens": skip_special_tokens,
            "spaces_between_special_tokens": spaces_between_special_tokens,
        }
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self.kwargs)

    def update(self, ids: list[int]) -> str:
        """Feed the full output id list; returns the newly finalized text (maybe empty)."""
        prefix_text = self._decode(ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(ids)
            self.text += delta
            return delta
        return ""

    def decode_whole(self, ids: list[int]) -> None:
        """Finalize ``ids`` in one decode, on a detokenizer that has seen none of them: the
        text ``update`` then ``flush`` would give (from offset 0 both release exactly
        ``decode(ids)``), for a third of their decoding."""
        if self.read_offset:
            raise ValueError("decode_whole needs a fresh detokenizer")
        self.text = self._decode(ids)
        self.prefix_offset = self.read_offset = len(ids)

    def flush(self, ids: list[int]) -> str:
        """At the end of a request: release whatever is left, incomplete characters included."""
        rest = self._decode(ids[self.prefix_offset :])[
            len(self._decode(ids[self.prefix_offset : self.read_offset])) :
        ]
        self.prefix_offset = self.read_offset = len(ids)
        self.text += rest
        return rest


def find_stop(text: str, stops: list[str], search_from: int) -> tuple[int, str] | None:
    """Earliest stop string occurring in ``text`` that ends after ``search_from``."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, max(0, search_from - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters could still grow into a stop string: streaming must not
    release them yet, or the client would see text that is later trimmed."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold
