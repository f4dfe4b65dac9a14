"""Tool-call parsers on outputs as each model family writes them (the formats are fixed, so no
model is needed): whole answers, streams fed one character at a time that must assemble to the
same calls, and malformed calls that must come back as content."""

from __future__ import annotations

import json

import pytest

from plait.server.tools.parsers import PARSERS, detect, get_parser
from plait.server.tools.parsers.base import ToolCall
from plait.server.tools.stream import ToolStream

W = ToolCall(name="get_weather", arguments='{"city": "Paris", "unit": "celsius"}')
T = ToolCall(name="get_time", arguments="{}")

# (parser, recorded output, content, calls)
RECORDED = [
    # Qwen2.5-7B-Instruct
    (
        "qwen25",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
        '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "",
        [W, T],
    ),
    # Hermes-2-Pro: text before the call, no newline inside the tags
    (
        "hermes",
        'Let me look that up.\n<tool_call>{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "celsius"}}</tool_call>',
        "Let me look that up.\n",
        [W],
    ),
    # Qwen3 left the close tag out at the end of its output
    ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {}}', "", [T]),
    # Llama-3.1-8B-Instruct, with and without <|python_tag|>
    (
        "llama3",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": '
        '"celsius"}}; {"name": "get_time", "parameters": {}}',
        "",
        [W, T],
    ),
    ("llama3", '{"name": "get_time", "parameters": {}}', "", [T]),
    # Mistral-7B-Instruct-v0.3 and the v11 (Mistral-Small-3.2) form
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
        '"celsius"}}, {"name": "get_time", "arguments": {}}]',
        "",
        [W, T],
    ),
    ("mistral", "[TOOL_CALLS]get_time[ARGS]{}", "", [T]),
    # Llama-4 / pythonic small models
    (
        "pythonic",
        '[get_weather(city="Paris", unit="celsius"), get_time()]',
        "",
        [W, T],
    ),
    # keys in another order: read whole, arguments re-serialized
    ("hermes", '<tool_call>{"arguments": {}, "name": "get_time"}</tool_call>', "", [T]),
]

MALFORMED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": }}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'),  # cut short
    ("hermes", "<tool_call>not json</tool_call>"),
    ("hermes", '<tool_call>{"name": "f", "arguments": "a string"}</tool_call>'),
    ("llama3", '{"name": "get_weather", "parameters": [1, 2]}'),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {}}'),  # array not closed
    ("mistral", "[TOOL_CALLS] sorry"),
    ("pythonic", "[get_weather(1, 2)]"),  # positional arguments
    ("pythonic", "[get_weather(city=open('x'))]"),  # not a literal
]


def _assemble(deltas: list[dict]) -> tuple[str, list[ToolCall]]:
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for c in d.get("tool_calls", []):
            entry = calls.setdefault(c["index"], {"name": None, "arguments": ""})
            if "id" in c:
                assert entry["name"] is None and c["id"].startswith("call_")
                entry["name"] = c["function"]["name"]
            entry["arguments"] += c["function"]["arguments"]
    return content, [ToolCall(name=c["name"], arguments=c["arguments"]) for c in calls.values()]


def _stream(parser: str, text: str) -> list[dict]:
    s = ToolStream(get_parser(parser))
    deltas = []
    for i in range(len(text) + 1):
        deltas += s.feed(text[:i], False)
    return deltas + s.feed(text, True)


def _same(a: list[ToolCall], b: list[ToolCall]) -> bool:
    return [(c.name, json.loads(c.arguments)) for c in a] == [
        (c.name, json.loads(c.arguments)) for c in b
    ]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), RECORDED)
def test_recorded_outputs_parse_into_their_calls(parser, text, content, calls):
    got_content, got = get_parser(parser).parse(text)
    assert got_content == content
    assert _same(got, calls)


@pytest.mark.parametrize(("parser", "text", "content", "calls"), RECORDED)
def test_streamed_deltas_assemble_to_the_whole_answer(parser, text, content, calls):
    whole_content, whole = get_parser(parser).parse(text)
    deltas = _stream(parser, text)
    got_content, got = _assemble(deltas)
    assert got_content == whole_content
    assert got == whole  # the very same argument text, not only equal JSON
    names_first = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert all("id" in c or c["index"] < len(calls) for c in names_first)


@pytest.mark.parametrize(("parser", "text"), MALFORMED)
def test_malformed_calls_come_back_as_content(parser, text):
    """Whole answers: all content, no call. A stream cannot take back a call whose name it
    already sent (constrained decoding prevents that case), but its content is still the
    whole text, so nothing the model wrote is lost."""
    assert get_parser(parser).parse(text) == (text, [])
    content, _ = _assemble(_stream(parser, text))
    assert content == text


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_text_without_calls_streams_as_content_unchanged(parser):
    text = "The weather in [Paris] is {mild} today; no tool needed <tool"
    assert get_parser(parser).parse(text) == (text, [])
    assert _assemble(_stream(parser, text)) == (text, [])


def test_arguments_stream_in_pieces_after_the_name():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    calls = [c for d in _stream("hermes", text) for c in d.get("tool_calls", [])]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert len(calls) > 3 and all("id" not in c for c in calls[1:])


def test_render_then_parse_is_the_identity():
    for name in PARSERS:
        p = get_parser(name)
        assert _same(p.parse(p.render([W, T]))[1], [W, T]), name


@pytest.mark.parametrize(
    ("template", "family"),
    [
        ("{% for tool in tools %}<tool_call>{% endfor %}", "hermes"),
        ("{{- '<|python_tag|>' + tool_call.name }}", "llama3"),
        ("{{ '[TOOL_CALLS]' }}{{ tools | tojson }}", "mistral"),
        ("{{ messages }}", None),
        ("<tool_call> and [TOOL_CALLS]", None),  # two families: not guessed
    ],
)
def test_family_is_detected_from_the_chat_template_only_when_unambiguous(template, family):
    assert detect(template) == family
