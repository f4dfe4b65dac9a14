"""Llama 3.1/3.2 JSON calls: ``<|python_tag|>`` (optional), then
``{"name": ..., "parameters": {...}}``, several separated by ``;`` (SGLang's ``llama3``)."""

from __future__ import annotations

import json
import re

from plait.server.tools.parsers.base import Scan, ToolCall, ToolParser, held_back
from plait.server.tools.parsers.json_text import scan_call, skip_ws

_OBJECT_START = re.compile(r'\{\s*"name"\s*:')
_PARTIAL_START = re.compile(r'\{\s*("n?a?m?e?"?\s*)?$')


class Llama3Parser(ToolParser):
    name = "llama3"
    start = "<|python_tag|>"
    args_keys = ("parameters", "arguments")

    def _first(self, text: str) -> tuple[int, int]:
        """(where the call region starts, where its first call object starts); -1s if none."""
        tag = text.find(self.start)
        m = _OBJECT_START.search(text)
        if m is not None and (tag < 0 or m.start() < tag):
            return m.start(), m.start()
        if tag >= 0:
            return tag, skip_ws(text, tag + len(self.start))
        return -1, -1

    def scan(self, text: str) -> Scan:
        region, pos = self._first(text)
        if region < 0:
            content = held_back(text, (self.start,))
            m = _PARTIAL_START.search(content)
            return Scan(content=content[: m.start()] if m else content)
        s = Scan(content=text[:region])
        while True:
            draft, pos = scan_call(text, pos, self.args_keys)
            if draft is None:
                s.ok = False
                return s
            s.calls.append(draft)
            if not draft.complete:
                return s
            pos = skip_ws(text, pos)
            if text.startswith(";", pos):
                pos = skip_ws(text, pos + 1)
                if pos == len(text):
                    s.calls.append(type(draft)())
                    return s
            if not text.startswith("{", pos):
                s.trailing = text[pos:]
                return s

    def render(self, calls: list[ToolCall]) -> str:
        return self.start + "; ".join(
            f'{{"name": {json.dumps(c.name)}, "parameters": {c.arguments}}}' for c in calls
        )
