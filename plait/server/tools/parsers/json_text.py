"""Scanning JSON inside model output: where a value ends, and a call object read
name-first so its arguments can be streamed as they are written.

The arguments of a call are kept as the model wrote them (a span of the output), never
re-serialized: a stream sends that span piece by piece, so the finished answer must hold the
same text.
"""

from __future__ import annotations

import json
import re

from plait.server.tools.parsers.base import CallDraft, dumps

_OPEN = {"{": "}", "[": "]"}


def value_end(text: str, pos: int) -> int | None:
    """Index just past the object/array opening at ``text[pos]``; None if unfinished.
    Brackets inside strings do not count; mismatched brackets end nothing (None) and are
    caught when the span is decoded."""
    stack: list[str] = []
    in_str = escaped = False
    for i in range(pos, len(text)):
        c = text[i]
        if in_str:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in _OPEN:
            stack.append(_OPEN[c])
        elif c in "}]":
            if not stack or stack.pop() != c:
                return None
            if not stack:
                return i + 1
    return None


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _head(args_keys: tuple[str, ...]) -> re.Pattern[str]:
    keys = "|".join(map(re.escape, args_keys))
    return re.compile(
        r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:' + keys + r')"\s*:\s*', re.DOTALL
    )


_HEADS: dict[tuple[str, ...], re.Pattern[str]] = {}


def scan_call(text: str, pos: int, args_keys: tuple[str, ...]) -> tuple[CallDraft | None, int]:
    """The call object ``{"name": ..., "<args key>": {...}}`` starting at ``text[pos]``.

    Returns ``(draft, end)``: ``end`` is just past the object once complete; a None draft
    means the text there cannot be such a call. Name-first objects stream (name, then the
    arguments' text as written); any other key order is read only once whole, its arguments
    re-serialized."""
    head = _HEADS.setdefault(args_keys, _head(args_keys))
    m = head.match(text, pos)
    if m is not None:
        name = json.loads(f'"{m.group(1)}"')
        a = m.end()
        if a == len(text):
            return CallDraft(name=name), len(text)
        if text[a] != "{":
            return None, pos
        end = value_end(text, a)
        if end is None:
            return CallDraft(name=name, arguments=text[a:]), len(text)
        close = skip_ws(text, end)
        if close == len(text):
            return CallDraft(name=name, arguments=text[a:end]), len(text)
        if text[close] == "}":
            return CallDraft(name=name, arguments=text[a:end], complete=True), close + 1
    return _whole_call(text, pos, args_keys)


def _whole_call(text: str, pos: int, args_keys: tuple[str, ...]) -> tuple[CallDraft | None, int]:
    if pos >= len(text) or text[pos] != "{":
        return (CallDraft(), pos) if pos >= len(text) else (None, pos)
    end = value_end(text, pos)
    if end is None:
        return CallDraft(), len(text)  # unfinished: undecided until it is whole
    try:
        obj = json.loads(text[pos:end])
    except ValueError:
        return None, pos
    keys = [k for k in args_keys if k in obj]
    if not isinstance(obj.get("name"), str) or len(keys) != 1 or set(obj) != {"name", keys[0]}:
        return None, pos
    args = obj[keys[0]]
    if not isinstance(args, dict):
        return None, pos
    return CallDraft(name=obj["name"], arguments=dumps(args), complete=True), end
