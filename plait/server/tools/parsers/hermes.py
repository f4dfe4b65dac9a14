"""Hermes / Qwen2.5 / Qwen3: ``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>``,
one block per call (SGLang's ``hermes`` and ``qwen25``/``qwen`` parsers)."""

from __future__ import annotations

import json

from plait.server.tools.parsers.base import Scan, ToolCall, ToolParser, held_back
from plait.server.tools.parsers.json_text import scan_call, skip_ws


class HermesParser(ToolParser):
    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"
    args_keys = ("arguments", "parameters")

    def scan(self, text: str) -> Scan:
        first = text.find(self.start)
        if first < 0:
            return Scan(content=held_back(text, (self.start,)))
        s = Scan(content=text[:first])
        pos = first
        while True:
            pos = skip_ws(text, pos + len(self.start))
            draft, pos = scan_call(text, pos, self.args_keys)
            if draft is None:
                s.ok = False
                return s
            s.calls.append(draft)
            if not draft.complete:
                return s
            pos = skip_ws(text, pos)
            rest = text[pos:]
            if self.end.startswith(rest):  # the close tag, unfinished or left out at the end
                return s
            if not rest.startswith(self.end):
                s.ok = False
                return s
            pos = skip_ws(text, pos + len(self.end))
            if not text.startswith(self.start, pos):
                s.trailing = text[pos:]
                return s

    def render(self, calls: list[ToolCall]) -> str:
        return "\n".join(
            f'{self.start}\n{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}\n{self.end}'
            for c in calls
        )


class Qwen25Parser(HermesParser):
    name = "qwen25"
