"""Splitting a reasoning model's output into its reasoning and its answer.

``separate_reasoning(gen("a"), model_type="qwen3")`` names the model family the way SGLang's
reasoning parsers do. Each family here marks its reasoning with a start and an end tag; the
facts (tags, which families reason without writing the start tag, which tool-call marker ends
an unfinished reasoning) are SGLang's (``sglang/srt/parser/reasoning_parser.py``, 0.5.23).
The split follows its one-shot parse:

- a family that is *forced* is reasoning from the first token, start tag or not; any other
  family reasons only if the start tag appears;
- leading start tags are dropped; the text up to the first end tag is the reasoning, the rest
  (as written, not stripped) is the answer;
- no end tag: a tool-call marker ends the reasoning (the marker stays in the answer), else the
  whole text is reasoning cut short by the token limit, and the answer is empty.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ReasoningFormat:
    start: str
    end: str
    forced: bool = False  # reasoning begins without the start tag
    tool_start: str | None = None  # a tool call ends reasoning that was never closed


_THINK = dict(start="<think>", end="</think>")
_QWEN3 = ReasoningFormat(**_THINK, tool_start="<tool_call>")
_FORCED = ReasoningFormat(**_THINK, forced=True)

FORMATS: dict[str, ReasoningFormat] = {
    "deepseek-r1": _FORCED,
    "step3": _FORCED,
    "step3p5": _FORCED,
    "gigachat35": _FORCED,
    "qwen3": _QWEN3,
    "deepseek-v3": _QWEN3,
    "mimo": _QWEN3,
    "interns1": _QWEN3,
    "nanbeige": _QWEN3,
    "dots": _QWEN3,
    "glm45": _QWEN3,
    "qwen3-thinking": ReasoningFormat(**_THINK, forced=True, tool_start="<tool_call>"),
    "minimax": ReasoningFormat(**_THINK, forced=True, tool_start="<tool_call>"),
    "kimi": ReasoningFormat(start="\u25c1think\u25b7", end="\u25c1/think\u25b7"),
    "kimi_k2": ReasoningFormat(**_THINK, tool_start="<|tool_calls_section_begin|>"),
}


def reasoning_format(model_type: str | None) -> ReasoningFormat:
    """The format of ``model_type`` (case-insensitive, as SGLang); ``ValueError`` naming the
    supported families otherwise."""
    fmt = FORMATS.get(model_type.lower()) if isinstance(model_type, str) else None
    if fmt is None:
        raise ValueError(f"model_type must be one of {sorted(FORMATS)}, got {model_type!r}")
    return fmt


def split_reasoning(text: str, model_type: str) -> tuple[str, str]:
    """``(reasoning, answer)`` of a finished output; ``("", text)`` when it did not reason."""
    fmt = reasoning_format(model_type)
    if not fmt.forced and fmt.start not in text:
        return "", text
    while text.startswith(fmt.start):
        text = text[len(fmt.start) :]
    if fmt.end in text:
        reasoning, answer = text.split(fmt.end, 1)
        return reasoning, answer
    if fmt.tool_start is not None and fmt.tool_start in text:
        i = text.index(fmt.tool_start)
        return text[:i], text[i:]
    return text, ""
