"""``--reasoning-parser`` on recorded ``<think>`` outputs: whole answers, streams fed a
character at a time (which must assemble to the whole answer), ``stream_reasoning`` false,
and a Qwen3-style chat template whose ``enable_thinking`` decides where the output starts."""

from __future__ import annotations

import jinja2
import pytest

from plait.server.chat_output import ChatShape
from plait.server.reasoning import ReasoningParser, ReasoningStream
from plait.server.tools.parsers import get_parser
from plait.server.tools.request import ToolPlan

# (parser, rendered prompt, recorded output, reasoning, answer)
RECORDED = [
    # Qwen3-0.6B, thinking on: the output opens the block itself
    (
        "qwen3",
        "",
        "<think>\nThe user asks 2+2.\n</think>\n\n2 + 2 = 4.",
        "\nThe user asks 2+2.\n",
        "\n\n2 + 2 = 4.",
    ),
    # Qwen3 with no reasoning at all
    ("qwen3", "", "2 + 2 = 4.", "", "2 + 2 = 4."),
    # DeepSeek-R1-Distill: the template wrote "<think>\n", the output starts inside it
    (
        "deepseek-r1",
        "<|Assistant|><think>\n",
        "Simple sum.\n</think>\n\nIt is 4.",
        "Simple sum.\n",
        "\n\nIt is 4.",
    ),
    # a Qwen3-Thinking-2507 template opens the block in the prompt
    ("qwen3", "<|im_start|>assistant\n<think>\n", "hmm</think>4", "hmm", "4"),
    # cut short by max_tokens inside the reasoning: all of it is reasoning
    ("deepseek-r1", "", "Let me think about", "Let me think about", ""),
    # a tool call ends a reasoning block that was never closed (kept in the answer)
    (
        "qwen3",
        "",
        "<think>I need the weather<tool_call>{}</tool_call>",
        "I need the weather",
        "<tool_call>{}</tool_call>",
    ),
]


@pytest.mark.parametrize(("fam", "prompt", "text", "reasoning", "answer"), RECORDED)
def test_recorded_reasoning_splits(fam, prompt, text, reasoning, answer):
    s = ReasoningParser(fam, prompt).split(text)
    assert (s.reasoning, s.answer) == (reasoning, answer)


@pytest.mark.parametrize("stream_reasoning", [True, False])
@pytest.mark.parametrize(("fam", "prompt", "text", "reasoning", "answer"), RECORDED)
def test_streamed_reasoning_assembles_to_the_split(
    fam, prompt, text, reasoning, answer, stream_reasoning
):
    shape = ChatShape(reasoning=ReasoningParser(fam, prompt), stream_reasoning=stream_reasoning)
    stream = shape.stream()
    deltas = [d for i in range(len(text) + 1) for d in stream.feed(text[:i], False)]
    deltas += stream.feed(text, True)
    pieces = [d["reasoning_content"] for d in deltas if "reasoning_content" in d]
    assert "".join(pieces) == reasoning
    assert "".join(d.get("content", "") for d in deltas) == answer
    if not stream_reasoning:
        assert len(pieces) <= 1  # in one piece, once the reasoning ended
    message, _ = shape.message(text, "stop")
    assert message["reasoning_content"] == (reasoning or None)
    assert message["content"] == answer


def test_reasoning_stream_holds_back_a_partial_end_tag():
    s = ReasoningStream(ReasoningParser("qwen3"))
    assert s.feed("<think>abc</thi", False) == ("abc", "")
    assert s.feed("<think>abc</think>ok", False) == ("", "ok")


def test_reasoning_then_a_tool_call_in_one_message():
    plan = ToolPlan(
        parser=get_parser("hermes"),
        tools=[],
        schemas={},
        choice="auto",
        named=None,
        parallel=True,
    )
    shape = ChatShape(tools=plan, reasoning=ReasoningParser("qwen3"))
    text = (
        '<think>need data</think>\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    )
    message, finish = shape.message(text, "stop")
    assert message["reasoning_content"] == "need data"
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert finish == "tool_calls"


# A Qwen3-style template: enable_thinking=false writes an empty, closed think block.
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}"
)


@pytest.mark.parametrize(
    ("kwargs", "output", "reasoning", "answer"),
    [
        ({}, "<think>sum</think>4", "sum", "4"),
        ({"enable_thinking": False}, "4", "", "4"),
        # thinking off and the model still writes a block: it opens one, so it is reasoning
        ({"enable_thinking": False}, "<think>x</think>4", "x", "4"),
    ],
)
def test_enable_thinking_through_a_qwen3_style_template(kwargs, output, reasoning, answer):
    prompt = jinja2.Template(QWEN3_TEMPLATE).render(
        messages=[{"role": "user", "content": "2+2?"}], **kwargs
    )
    s = ReasoningParser("qwen3", prompt).split(output)
    assert (s.reasoning, s.answer) == (reasoning, answer)


def test_unknown_reasoning_parser_is_refused_with_the_names():
    with pytest.raises(ValueError, match="qwen3"):
        ReasoningParser("nope")
