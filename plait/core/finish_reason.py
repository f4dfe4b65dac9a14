"""Why a request ended: one small value, built by name, sent as a dict.

The core builds a :class:`FinishReason` with one of its four constructors; what crosses to the
server and the user is ``to_dict()``, the SGLang-compatible wire format (``{"type": "stop",
"matched": ...}``, ``{"type": "length", "length": n}``, ``{"type": "abort", "message": ...}``,
``{"type": "error", "message": ...}``). ``error`` is an engine failure the server reports as a
5xx; ``abort`` is a request the user or memory pressure ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class FinishReason:
    kind: str  # "stop" | "length" | "abort" | "error"
    matched: int | str | None = None  # stop: the token id or stop string hit (None: grammar)
    output_len: int | None = None  # length: the output length reached
    message: str | None = None  # abort / error: why

    @classmethod
    def stop(cls, matched: int | str | None) -> FinishReason:
        return cls(kind="stop", matched=matched)

    @classmethod
    def length(cls, n: int) -> FinishReason:
        return cls(kind="length", output_len=n)

    @classmethod
    def abort(cls, message: str) -> FinishReason:
        return cls(kind="abort", message=message)

    @classmethod
    def error(cls, message: str) -> FinishReason:
        return cls(kind="error", message=message)

    @property
    def stopped_on_token(self) -> bool:
        """A stop token (EOS or ``stop_token_ids``) ended it: the text may drop that token."""
        return self.kind == "stop" and isinstance(self.matched, int)

    @property
    def stopped_on_string(self) -> bool:
        return self.kind == "stop" and isinstance(self.matched, str)

    def to_dict(self) -> dict[str, Any]:
        """The wire format; the key after ``type`` depends on the kind."""
        if self.kind == "stop":
            return {"type": "stop", "matched": self.matched}
        if self.kind == "length":
            return {"type": "length", "length": self.output_len}
        return {"type": self.kind, "message": self.message}
