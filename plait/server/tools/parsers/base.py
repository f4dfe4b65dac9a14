"""What every tool-call parser returns, and the one rule for turning a scan into an answer.

A parser reads the text a model has written so far and returns a ``Scan``: the content before
the first call (minus any tail that may still become a call-open marker), the calls seen so far
as ``CallDraft``s, and the text after the last call. The same ``scan`` serves a finished answer
(``parse``) and a stream (``ToolStream``), so a streamed call assembles to exactly the call a
non-streamed answer returns.

Invariants a parser keeps:
- for a growing text, ``content`` only grows and each draft's ``arguments`` only grows (each
  scan's is a prefix of the next one's), so deltas never need taking back;
- a draft's ``name`` is set only once the name is complete;
- ``ok`` is False when the call region cannot be a call in this family's syntax; a finished
  text that is not ``ok``, or whose last call is unfinished, is returned whole as content
  (a malformed call is never an error).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(kw_only=True)
class CallDraft:
    name: str | None = None  # set once complete
    arguments: str = ""  # the arguments' JSON text so far
    complete: bool = False


@dataclass(kw_only=True)
class Scan:
    content: str
    calls: list[CallDraft] = field(default_factory=list)
    trailing: str = ""  # text after the last finished call
    ok: bool = True


@dataclass(frozen=True, kw_only=True)
class ToolCall:
    """One finished call: ``arguments`` is a JSON object's text."""

    name: str
    arguments: str


def held_back(text: str, markers: tuple[str, ...]) -> str:
    """``text`` without its longest tail that is a proper prefix of one of ``markers``: that
    tail may still become a call-open marker, so it is not yet content."""
    for n in range(min(len(text), max(map(len, markers), default=0)), 0, -1):
        tail = text[-n:]
        if any(m.startswith(tail) and m != tail for m in markers):
            return text[:-n]
    return text


class ToolParser:
    """One model family's call syntax. Subclasses set ``name`` (SGLang's ``--tool-call-parser``
    name), ``start`` (the call-open marker, also the structural-tag trigger) and implement
    ``scan`` and ``render``."""

    name: ClassVar[str]
    start: ClassVar[str]

    def scan(self, text: str) -> Scan:
        raise NotImplementedError

    def render(self, calls: list[ToolCall]) -> str:
        """``calls`` written as this family writes them (for a template that cannot)."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """``(content, calls)`` of a finished text; ``(text, [])`` unless every call is whole
        and its arguments are a JSON object."""
        s = self.scan(text)
        calls = []
        for d in s.calls if s.ok else []:
            if not d.complete or d.name is None or not is_json_object(d.arguments):
                return text, []
            calls.append(ToolCall(name=d.name, arguments=d.arguments))
        if not calls:
            return text, []
        return s.content + s.trailing, calls


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def dumps(value: Any) -> str:
    """Arguments re-serialized where the model's own text cannot be kept (pythonic calls)."""
    return json.dumps(value, ensure_ascii=False)
