"""Pythonic calls: ``[get_weather(city="Paris"), get_time()]`` (SGLang's ``pythonic``, as
Llama 4 and some small models write them). Keyword arguments only; values are Python
literals, and JSON's ``true``/``false``/``null`` are read as well (the constrained grammar
writes JSON values). A call is sent whole once its closing parenthesis is written: its
arguments are re-serialized as JSON, so they are not streamed piece by piece."""

from __future__ import annotations

import ast
import re

from plait.server.tools.parsers.base import CallDraft, Scan, ToolCall, ToolParser, dumps

_LIST_START = re.compile(r"\[\s*[A-Za-z_][\w.]*\(")
_PARTIAL = re.compile(r"\[\s*[A-Za-z_\w.]*$")
_JSON_NAMES = {"true": True, "false": False, "null": None}


class PythonicParser(ToolParser):
    name = "pythonic"
    start = "["

    def scan(self, text: str) -> Scan:
        m = _LIST_START.search(text)
        if m is None:
            p = _PARTIAL.search(text)
            return Scan(content=text[: p.start()] if p else text)
        s = Scan(content=text[: m.start()])
        pos = m.start() + 1
        while True:
            pos = _skip(text, pos)
            end = _call_end(text, pos)
            if end is None:
                s.calls.append(CallDraft())
                return s
            call = _read_call(text[pos:end])
            if call is None:
                s.ok = False
                return s
            s.calls.append(CallDraft(name=call.name, arguments=call.arguments, complete=True))
            pos = _skip(text, end)
            if pos == len(text):
                s.calls[-1].complete = False  # the list is not closed yet
                return s
            if text[pos] == "]":
                s.trailing = text[pos + 1 :]
                return s
            if text[pos] != ",":
                s.ok = False
                return s
            pos += 1

    def render(self, calls: list[ToolCall]) -> str:
        import json

        def one(c: ToolCall) -> str:
            args = json.loads(c.arguments)
            return f"{c.name}(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"

        return "[" + ", ".join(map(one, calls)) + "]"


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _call_end(text: str, pos: int) -> int | None:
    """Just past the ``)`` closing the call at ``pos``; None while unfinished."""
    depth, quote, escaped = 0, "", False
    for i in range(pos, len(text)):
        c = text[i]
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0 and c == ")":
                return i + 1
            if depth <= 0:
                return i + 1  # a stray close: _read_call refuses the span
    return None


def _read_call(src: str) -> ToolCall | None:
    try:
        node = ast.parse(src.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
        return None
    name = ast.unparse(node.func)
    if not re.fullmatch(r"[A-Za-z_][\w.]*", name):
        return None
    try:
        args = {k.arg: _literal(k.value) for k in node.keywords}
    except (ValueError, TypeError):
        return None
    return ToolCall(name=name, arguments=dumps(args))


def _literal(node: ast.expr) -> object:
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}  # type: ignore[arg-type]
    value = ast.literal_eval(node)
    if isinstance(value, tuple):
        return list(value)
    return value
