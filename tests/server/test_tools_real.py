"""Constrained tool calls with the real SmolLM2-135M-Instruct behind ``plait serve``: with
``tool_choice`` required or a named function every call parses and validates against its
function's schema (enums, integer bounds, nested objects, arrays), sampled at temperature 1;
streamed calls equal non-streamed ones; a two-turn loop with a tool result; and LangChain's
``ChatOpenAI.bind_tools`` completing a two-step tool loop, all through unmodified clients.

SmolLM2's chat template knows no tools, so Plait writes them into the prompt in the hermes
syntax (``plait.server.tools.prompt``); the model alone would rarely write a valid call.
"""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book_table",
            "description": "Book a restaurant table",
            "parameters": {
                "type": "object",
                "properties": {
                    "restaurant": {"type": "string", "maxLength": 20},
                    "people": {"type": "integer", "minimum": 1, "maximum": 12},
                    "time": {
                        "type": "object",
                        "properties": {
                            "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                            "minute": {"type": "integer", "minimum": 0, "maximum": 59},
                        },
                        "required": ["hour", "minute"],
                        "additionalProperties": False,
                    },
                },
                "required": ["restaurant", "people", "time"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add_todos",
            "description": "Add items to the todo list",
            "parameters": {
                "type": "object",
                "properties": {
                    "items": {
                        "type": "array",
                        "items": {"type": "string", "maxLength": 16},
                        "minItems": 1,
                        "maxItems": 3,
                    },
                    "priority": {"type": "string", "enum": ["low", "high"]},
                },
                "required": ["items", "priority"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = [
    "What's the weather like in Paris today?",
    "Book a table for four at Luigi's at half past seven tonight.",
    "Remind me to buy milk and call mom.",
    "Hello! How are you?",
]
CHOICES = ["required", *({"type": "function", "function": {"name": n}} for n in SCHEMAS)]


@pytest.fixture(scope="module")
def client(real_server):
    return openai.OpenAI(base_url=real_server.url + "/v1", api_key="none", max_retries=0)


def _model(client) -> str:
    return client.models.list().data[0].id


def _check_calls(message, allowed: set[str]) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_every_forced_call_parses_and_validates_against_its_schema(client):
    model, results = _model(client), []
    for i, prompt in enumerate(PROMPTS):
        for choice in CHOICES:
            r = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                tools=TOOLS,
                tool_choice=choice,
                parallel_tool_calls=False,
                temperature=1.0,
                seed=i,
                max_tokens=200,
            )
            allowed = set(SCHEMAS) if choice == "required" else {choice["function"]["name"]}
            assert r.choices[0].finish_reason == "tool_calls", r
            _check_calls(r.choices[0].message, allowed)
            results.append(r.choices[0].message.tool_calls[0].function.arguments)
    assert len(results) == len(PROMPTS) * len(CHOICES)


def test_streamed_forced_calls_equal_the_non_streamed_ones(client):
    model = _model(client)
    body = dict(
        model=model,
        messages=[{"role": "user", "content": PROMPTS[1]}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,  # greedy, the model would write calls until max_tokens
        temperature=0,
        max_tokens=300,
    )
    whole = client.chat.completions.create(**body).choices[0]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**body, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                e = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                e["name"] += tc.function.name or ""
                e["arguments"] += tc.function.arguments or ""
    assert finish == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (t.function.name, t.function.arguments) for t in whole.message.tool_calls
    ]


def test_a_two_turn_loop_with_a_tool_result(client):
    model = _model(client)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    first = client.chat.completions.create(
        model=model,
        messages=messages,
        tools=TOOLS,
        tool_choice=CHOICES[1],
        parallel_tool_calls=False,  # one call, whole: a second one could run past max_tokens
        temperature=0,
        max_tokens=100,
    )
    call = first.choices[0].message.tool_calls[0]
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    second = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, temperature=0, max_tokens=40
    )
    reply = second.choices[0]
    if reply.message.tool_calls:  # auto: another call is allowed, and it must validate
        _check_calls(reply.message, set(SCHEMAS))
    else:
        assert reply.message.content and reply.finish_reason in ("stop", "length")


def test_langchain_bind_tools_completes_a_two_step_tool_loop(real_server, client):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """Current weather in a city."""
        return f"18 degrees {unit} and sunny in {city}"

    spec = TOOLS[0]  # the same function, its city bounded (greedy SmolLM2 rambles on)

    llm = ChatOpenAI(
        base_url=real_server.url + "/v1",
        api_key="none",
        model=_model(client),
        temperature=0,
        max_tokens=200,
        max_retries=0,
    )
    messages = [HumanMessage("What's the weather in Paris?")]
    # one call: greedy, a forced model would write calls until max_tokens
    step1 = llm.bind_tools([spec], tool_choice="get_weather", parallel_tool_calls=False).invoke(
        messages
    )
    assert [c["name"] for c in step1.tool_calls] == ["get_weather"]
    messages.append(step1)
    for c in step1.tool_calls:
        assert c["args"]["unit"] in ("celsius", "fahrenheit")
        messages.append(ToolMessage(get_weather.invoke(c["args"]), tool_call_id=c["id"]))
    step2 = llm.bind_tools([spec], tool_choice="none").invoke(messages)
    assert isinstance(step2.content, str) and step2.content and not step2.tool_calls
