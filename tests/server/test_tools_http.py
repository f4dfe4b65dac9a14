"""Tool calls and reasoning through the HTTP stack and the unmodified ``openai`` SDK, with the
fake engine (it echoes its prompt): a chat template that renders only the last message makes
the "model" write exactly that message, so each test scripts the output it needs."""

from __future__ import annotations

import json

import openai
import pytest

from tests.server.conftest import FAKE, start_server

ECHO_TEMPLATE = (
    "{%- if tools %}{% endif -%}"  # reads tools: a tool-aware template
    "{{- messages[-1]['content'] -}}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


PARSERS = ["--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"]


@pytest.fixture(scope="module")
def echo_model(tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.server.fake_engine import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path_factory.mktemp("echo-model"))
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = ECHO_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(echo_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "tools.log"
    s = start_server([*FAKE, *PARSERS], log, str(echo_model), timeout=300)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def _ask(client, text: str, n: int = 0, **kw):
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": text}],
        max_tokens=len(text) + 8,
        extra_body={"rid": f"echo-once-{n}", **kw.pop("extra_body", {})},
        **kw,
    )


def _assemble(chunks) -> dict:
    out = {"content": "", "reasoning": "", "calls": {}, "finish": None}
    for ch in chunks:
        for c in ch.choices:
            d = c.delta
            out["content"] += d.content or ""
            out["reasoning"] += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                e = out["calls"].setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                e["id"] = e["id"] or tc.id
                e["name"] += (tc.function.name or "") if tc.function else ""
                e["arguments"] += (tc.function.arguments or "") if tc.function else ""
            out["finish"] = c.finish_reason or out["finish"]
    return out


def test_a_tool_call_comes_back_as_tool_calls_with_finish_reason(client):
    r = _ask(client, "Checking.\n" + CALL, tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking.\n"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_streamed_tool_call_assembles_to_the_same_call(client):
    whole = _ask(client, CALL, 1, tools=[WEATHER]).choices[0].message
    got = _assemble(_ask(client, CALL, 2, tools=[WEATHER], stream=True))
    assert got["finish"] == "tool_calls" and got["content"] == ""
    (call,) = got["calls"].values()
    assert call["name"] == "get_weather"
    assert call["arguments"] == whole.tool_calls[0].function.arguments


def test_tool_choice_none_leaves_the_call_in_the_content(client):
    r = _ask(client, CALL, 3, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.content == CALL and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"


def test_parallel_tool_calls_false_keeps_the_first_call(client):
    two = CALL + "\n" + CALL.replace("Paris", "Rome")
    r = _ask(client, two, 4, tools=[WEATHER], parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1
    got = _assemble(_ask(client, two, 5, tools=[WEATHER], parallel_tool_calls=False, stream=True))
    assert len(got["calls"]) == 1


def test_a_two_turn_loop_with_a_tool_result_is_accepted(client):
    first = _ask(client, CALL, 6, tools=[WEATHER]).choices[0].message
    r = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            first.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "18C, sunny"},
        ],
        tools=[WEATHER],
        max_tokens=8,
    )
    assert r.choices[0].message.content == "18C, sun"  # the echoed tool result


def test_reasoning_content_is_split_off_and_streamed(client):
    text = "<think>The user wants a sum.</think>4"
    r = _ask(client, text, 7).choices[0].message
    assert r.reasoning_content == "The user wants a sum." and r.content == "4"
    got = _assemble(_ask(client, text, 8, stream=True))
    assert (got["reasoning"], got["content"]) == ("The user wants a sum.", "4")
    not_streamed = _ask(client, text, 9, stream=True, extra_body={"stream_reasoning": False})
    assert _assemble(not_streamed)["reasoning"] == "The user wants a sum."
    kept = _ask(client, text, 10, extra_body={"separate_reasoning": False}).choices[0].message
    assert kept.content == text and getattr(kept, "reasoning_content", None) is None


def test_reasoning_then_a_call(client):
    r = _ask(client, "<think>need weather</think>" + CALL, 11, tools=[WEATHER]).choices[0]
    assert r.message.reasoning_content == "need weather"
    assert r.message.tool_calls[0].function.name == "get_weather"


@pytest.mark.parametrize(
    ("tools", "choice", "extra", "param", "says"),
    [
        (
            [{**WEATHER, "function": {**WEATHER["function"], "parameters": {"type": "nope"}}}],
            None,
            {},
            "tools[0].function",
            "get_weather",
        ),
        (
            [{**WEATHER, "function": {**WEATHER["function"], "parameters": {"type": "array"}}}],
            None,
            {},
            "tools[0].function",
            "get_weather",
        ),
        ([WEATHER, WEATHER], None, {}, "tools[1].function", "defined twice"),
        ([{**WEATHER, "function": {"name": "bad name!"}}], None, {}, "tools[0].function", "name"),
        (
            [WEATHER],
            {"type": "function", "function": {"name": "other"}},
            {},
            "tool_choice",
            "other",
        ),
        (None, "required", {}, "tool_choice", "requires tools"),
        (
            [WEATHER],
            "required",
            {"response_format": {"type": "json_object"}},
            "response_format",
            "cannot be combined",
        ),
    ],
)
def test_bad_tools_are_a_400_naming_the_function(server, tools, choice, extra, param, says):
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], **extra}
    body["model"] = server.get("/v1/models").json()["data"][0]["id"]
    if tools is not None:
        body["tools"] = tools
    if choice is not None:
        body["tool_choice"] = choice
    r = server.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"]


def test_malformed_tool_call_arguments_in_history_are_a_400(server):
    model = server.get("/v1/models").json()["data"][0]["id"]
    bad = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
    r = server.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "assistant", "tool_calls": [bad]}]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_frontend_separate_reasoning_reads_the_servers_reasoning_content(server, echo_model):
    """The frontend's OpenAI backend against a server with --reasoning-parser: the answer has
    no <think> left to split, so separate_reasoning takes the server's reasoning_content."""
    import plait as pl

    text = "<think>Because of physics.</think>It is blue."
    model = server.get("/v1/models").json()["data"][0]["id"]
    backend = pl.OpenAI(
        model, base_url=server.url + "/v1", api_key="none", tokenizer_path=str(echo_model)
    )

    @pl.function
    def ask(s):
        s += pl.user(text)
        s += pl.assistant(
            pl.separate_reasoning(pl.gen("answer", max_tokens=len(text)), model_type="qwen3")
        )

    state = ask.run(backend=backend)
    assert state.error() is None, state.error()
    assert state["answer"] == "It is blue."
    assert state["answer_reasoning_content"] == "Because of physics."


@pytest.mark.slow
def test_tools_and_reasoning_through_the_dp_gateway(echo_model, tmp_path):
    """``plait serve --dp 2``: SGLang's gateway forwards tools and the reasoning fields, and
    every worker got the parser flags."""
    from plait.server.data_parallel import PortBook

    book = PortBook()
    port, metrics = book.take(), book.take()
    args = [*FAKE, *PARSERS, "--dp", "2", "--router-prometheus-port", str(metrics)]
    server = start_server(args, tmp_path / "dp.log", str(echo_model), timeout=600, port=port)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        text = "<think>hm</think>" + CALL
        for _ in range(4):  # both workers answer
            # the gateway sets its own rid: the fake echoes until max_tokens ("length")
            r = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": text}],
                max_tokens=len(text),
                tools=[WEATHER],
            ).choices[0]
            assert r.message.reasoning_content == "hm"
            assert r.message.tool_calls[0].function.name == "get_weather"
            assert json.loads(r.message.tool_calls[0].function.arguments) == {"city": "Paris"}
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": CALL}],
            max_tokens=len(CALL),
            tools=[WEATHER],
            stream=True,
        )
        assert [c["name"] for c in _assemble(stream)["calls"].values()] == ["get_weather"]
    finally:
        server.stop()
