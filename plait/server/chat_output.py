"""A chat choice's text as OpenAI's assistant message: reasoning (``--reasoning-parser``)
split off first, then tool calls (``plait.server.tools``) read from the answer.

``ChatShape.message`` shapes a finished choice; ``ChatShape.stream`` gives a per-choice
``ChoiceStream`` whose deltas, concatenated, are that same message (both use the same parsers
on the same text). ``finish_reason`` becomes ``tool_calls`` when a choice that stopped on its
own made calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plait.server.reasoning import ReasoningParser, ReasoningStream
from plait.server.tools.request import ToolPlan
from plait.server.tools.stream import ToolStream, call_id, call_message


@dataclass(frozen=True, kw_only=True)
class ChatShape:
    tools: ToolPlan | None = None  # None, or tool_choice "none": no calls are read
    reasoning: ReasoningParser | None = None  # None: reasoning stays in the content
    stream_reasoning: bool = True

    @property
    def reads_calls(self) -> bool:
        return self.tools is not None and self.tools.parses

    def message(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """``(message, finish_reason)`` of a finished choice."""
        msg: dict[str, Any] = {"role": "assistant"}
        answer = text
        if self.reasoning is not None:
            split = self.reasoning.split(text)
            msg["reasoning_content"] = split.reasoning or None
            answer = split.answer
        calls = []
        if self.tools is not None and self.tools.parses:
            answer, calls = self.tools.parser.parse(answer)
            calls = calls[: self.tools.max_calls]
        msg["content"] = answer if answer or not calls else None
        if calls:
            msg["tool_calls"] = [call_message(None, c.name, c.arguments, call_id()) for c in calls]
        return msg, _finish(finish, bool(calls))

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self)


def _finish(finish: str | None, called: bool) -> str | None:
    return "tool_calls" if called and finish == "stop" else finish


class ChoiceStream:
    """One choice's deltas from its cumulative text."""

    def __init__(self, shape: ChatShape) -> None:
        self.reasoning = (
            ReasoningStream(shape.reasoning, shape.stream_reasoning)
            if shape.reasoning is not None
            else None
        )
        plan = shape.tools
        self.tools = (
            ToolStream(plan.parser, plan.max_calls) if plan is not None and plan.parses else None
        )
        self.sent = 0

    def feed(self, text: str, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        answer = text
        if self.reasoning is not None:
            piece, answer = self.reasoning.feed(text, final)
            if piece:
                deltas.append({"reasoning_content": piece})
        if self.tools is not None:
            return deltas + self.tools.feed(answer, final)
        new = answer[self.sent :]
        self.sent = max(self.sent, len(answer))
        return deltas + ([{"content": new}] if new else [])

    def finish_reason(self, finish: str | None) -> str | None:
        return _finish(finish, self.tools is not None and bool(self.tools.sent))
