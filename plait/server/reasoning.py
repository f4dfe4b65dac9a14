"""``--reasoning-parser``: a reasoning model's thinking as ``reasoning_content``, apart from
its answer, in whole answers and in stream deltas.

The families and their tags are the frontend's (``plait.frontend.reasoning``, SGLang's facts).
One rule serves answers and streams, so a stream assembles to the answer:

- the output starts inside the reasoning when the family is forced (``deepseek-r1``: its
  template writes ``<think>``), when the rendered prompt ends inside an open ``<think>`` block,
  or when the output itself starts with the start tag (``qwen3``); otherwise there is no
  reasoning and the whole output is the answer;
- the reasoning ends at the end tag (dropped) or at a tool-call marker (kept in the answer);
  unended, the whole output is reasoning (cut short by the token limit);
- while streaming, a tail that may be the start of a tag is held back until it is decided.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.frontend.reasoning import FORMATS, ReasoningFormat, reasoning_format

REASONING_PARSERS = sorted(FORMATS)


@dataclass(frozen=True, kw_only=True)
class Split:
    reasoning: str
    answer: str
    done: bool  # the reasoning has ended (or there is none)


def _held(text: str, tags: list[str]) -> str:
    for n in range(min(len(text), max(map(len, tags))), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return text[:-n]
    return text


class ReasoningParser:
    def __init__(self, model_type: str, prompt: str = "") -> None:
        self.fmt: ReasoningFormat = reasoning_format(model_type)
        tail = prompt.rstrip()
        self.opened = self.fmt.forced or (
            tail.rfind(self.fmt.start) > tail.rfind(self.fmt.end) and self.fmt.start in tail
        )

    def split(self, text: str, final: bool = True) -> Split:
        fmt = self.fmt
        body = text.lstrip()
        if not self.opened:
            if not body.startswith(fmt.start):
                if not final and fmt.start.startswith(body):
                    return Split(reasoning="", answer="", done=False)  # may yet open
                return Split(reasoning="", answer=text, done=True)
        while body.startswith(fmt.start):
            body = body[len(fmt.start) :]
        ends = [(body.find(t), t) for t in (fmt.end, fmt.tool_start) if t and t in body]
        if ends:
            i, tag = min(ends)
            answer = body[i + len(tag) :] if tag == fmt.end else body[i:]
            return Split(reasoning=body[:i], answer=answer, done=True)
        if final:
            return Split(reasoning=body, answer="", done=True)
        tags = [t for t in (fmt.start, fmt.end, fmt.tool_start) if t]
        return Split(reasoning=_held(body, tags), answer="", done=False)


class ReasoningStream:
    """Per choice: the reasoning delta and the answer text so far, from cumulative text.
    With ``stream_reasoning`` false the reasoning is sent in one piece when it ends."""

    def __init__(self, parser: ReasoningParser, stream_reasoning: bool = True) -> None:
        self.parser = parser
        self.stream_reasoning = stream_reasoning
        self.sent = 0

    def feed(self, text: str, final: bool) -> tuple[str, str]:
        """``(reasoning delta, answer so far)``."""
        s = self.parser.split(text, final)
        if not (self.stream_reasoning or s.done):
            return "", ""
        delta = s.reasoning[self.sent :]
        self.sent = max(self.sent, len(s.reasoning))
        return delta, s.answer
