"""Tool calls as OpenAI stream deltas: content first, then per call one delta with its id and
name, then its arguments in fragments. Fed the whole text so far each time, it sends what the
last scan added (``parsers.base`` guarantees content and arguments only grow), and on the final
text sends whatever the finished answer (``ToolParser.parse``) holds that was not sent, so the
deltas assemble to the non-streamed answer."""

from __future__ import annotations

import uuid
from typing import Any

from plait.server.tools.parsers.base import CallDraft, ToolParser


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_message(index: int | None, name: str, arguments: str, cid: str) -> dict[str, Any]:
    """One call as OpenAI writes it (``index`` only in stream deltas)."""
    out: dict[str, Any] = {"id": cid, "type": "function"}
    if index is not None:
        out = {"index": index, **out}
    return {**out, "function": {"name": name, "arguments": arguments}}


class ToolStream:
    """Per choice. ``max_calls`` is 1 when ``parallel_tool_calls`` is false: later calls are
    dropped, in the stream as in the answer."""

    def __init__(self, parser: ToolParser, max_calls: int | None = None) -> None:
        self.parser = parser
        self.max_calls = max_calls
        self.sent_content = 0
        self.sent: list[tuple[str, str]] = []  # per call: (id, arguments sent)
        self.has_calls = False

    def feed(self, text: str, final: bool) -> list[dict[str, Any]]:
        """The deltas (``{"content": ...}`` / ``{"tool_calls": [...]}``) ``text`` adds."""
        if final:
            return self._finish(text)
        s = self.parser.scan(text)
        if not s.ok:
            return []  # undecided until the end: a malformed call comes back as content
        out = self._content(s.content)
        return out + self._calls(s.calls)

    def _finish(self, text: str) -> list[dict[str, Any]]:
        content, calls = self.parser.parse(text)
        if not calls:
            return self._content(text)
        s = self.parser.scan(text)
        drafts = [CallDraft(name=c.name, arguments=c.arguments, complete=True) for c in calls]
        out = self._content(s.content) + self._calls(drafts)
        if s.trailing:
            out.append({"content": s.trailing})
        return out

    def _content(self, content: str) -> list[dict[str, Any]]:
        new = content[self.sent_content :]
        self.sent_content = max(self.sent_content, len(content))
        return [{"content": new}] if new else []

    def _calls(self, drafts: list[CallDraft]) -> list[dict[str, Any]]:
        out = []
        for i, d in enumerate(drafts[: self.max_calls]):
            if d.name is None:
                break
            if i == len(self.sent):
                self.sent.append((call_id(), ""))
                out.append(call_message(i, d.name, "", self.sent[i][0]))
            cid, done = self.sent[i]
            if d.arguments.startswith(done) and len(d.arguments) > len(done):
                piece = d.arguments[len(done) :]
                self.sent[i] = (cid, d.arguments)
                out.append({"index": i, "function": {"arguments": piece}})
        self.has_calls = self.has_calls or bool(self.sent)
        return [{"tool_calls": [c]} for c in out]
