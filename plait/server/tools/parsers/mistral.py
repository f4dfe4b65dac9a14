"""Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (SGLang's ``mistral``),
and the newer ``[TOOL_CALLS]name[ARGS]{...}`` of Mistral's v11 templates."""

from __future__ import annotations

import json
import re

from plait.server.tools.parsers.base import CallDraft, Scan, ToolCall, ToolParser, held_back
from plait.server.tools.parsers.json_text import scan_call, skip_ws, value_end

_NAMED = re.compile(r"([A-Za-z0-9_.\-]+)\[ARGS\]")


class MistralParser(ToolParser):
    name = "mistral"
    start = "[TOOL_CALLS]"
    args_keys = ("arguments",)

    def scan(self, text: str) -> Scan:
        first = text.find(self.start)
        if first < 0:
            return Scan(content=held_back(text, (self.start,)))
        s = Scan(content=text[:first])
        pos = skip_ws(text, first + len(self.start))
        while pos < len(text):
            if text[pos] == "[":
                pos = self._array(text, pos, s)
            else:
                pos = self._named(text, pos, s)
            if pos < 0 or not s.ok or (s.calls and not s.calls[-1].complete):
                return s
            pos = skip_ws(text, pos)
            if not text.startswith(self.start, pos):
                s.trailing = text[pos:]
                return s
            pos = skip_ws(text, pos + len(self.start))
        return s

    def _array(self, text: str, pos: int, s: Scan) -> int:
        """Calls of one ``[...]`` array into ``s``; where it ends, or -1 if unfinished."""
        pos = skip_ws(text, pos + 1)
        while True:
            draft, pos = scan_call(text, pos, self.args_keys)
            if draft is None:
                s.ok = False
                return -1
            s.calls.append(draft)
            pos = skip_ws(text, pos)
            if pos == len(text):  # a call stands only once its array is closed
                draft.complete = False
            if not draft.complete:
                return -1
            if text[pos] == "]":
                draft.complete = True
                return pos + 1
            if text[pos] != ",":
                s.ok = False
                return -1
            pos = skip_ws(text, pos + 1)

    def _named(self, text: str, pos: int, s: Scan) -> int:
        m = _NAMED.match(text, pos)
        if m is None:
            if not re.fullmatch(r"[A-Za-z0-9_.\-]*(\[A?R?G?S?)?", text[pos:]):
                s.ok = False
            else:
                s.calls.append(CallDraft())
            return -1
        a = skip_ws(text, m.end())
        if a < len(text) and text[a] != "{":
            s.ok = False
            return -1
        end = value_end(text, a) if a < len(text) else None
        s.calls.append(CallDraft(name=m.group(1), arguments=text[a:end], complete=end is not None))
        return end if end is not None else -1

    def render(self, calls: list[ToolCall]) -> str:
        body = ", ".join(
            f'{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}' for c in calls
        )
        return f"{self.start}[{body}]"
