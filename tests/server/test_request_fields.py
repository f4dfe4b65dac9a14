"""The request-field policy (plait/server/request_fields.py, docs/serving.md "Request fields"):
every field SGLang or OpenAI defines is accepted, an unsupported one only while it asks for
nothing, and a field nobody defines is a 400 naming it."""

from __future__ import annotations

import pytest
import requests

from plait.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    GenerateSamplingParams,
    StreamOptions,
)
from plait.server.request_fields import UNSUPPORTED, asks_for_nothing
from tests.server import sglang_request_fields as sglang
from tests.server.test_server_fake import model_name


def _openai_fields(module) -> set[str]:
    names: set[str] = set()
    for cls in (module.CompletionCreateParamsNonStreaming, module.CompletionCreateParamsStreaming):
        names |= cls.__required_keys__ | cls.__optional_keys__
    return names


def _openai_stream_option_fields() -> set[str]:
    from openai.types.chat import ChatCompletionStreamOptionsParam as Options

    return set(Options.__required_keys__ | Options.__optional_keys__)


def _coverage():
    import openai.types.chat.completion_create_params as chat
    import openai.types.completion_create_params as completion

    return [
        ("GenerateReqInput", sglang.GENERATE_REQ_INPUT, GenerateRequest),
        ("SamplingParams", sglang.SAMPLING_PARAMS, GenerateSamplingParams),
        ("sglang CompletionRequest", sglang.COMPLETION_REQUEST, CompletionRequest),
        ("sglang ChatCompletionRequest", sglang.CHAT_COMPLETION_REQUEST, ChatCompletionRequest),
        ("openai completions", _openai_fields(completion), CompletionRequest),
        ("openai chat completions", _openai_fields(chat), ChatCompletionRequest),
        ("openai stream_options", _openai_stream_option_fields(), StreamOptions),
    ]


@pytest.mark.parametrize("schema,names,model", _coverage(), ids=[c[0] for c in _coverage()])
def test_every_field_sglang_and_openai_define_is_declared(schema, names, model):
    # Declared = supported, or unsupported and validated by the table; undeclared is a 400.
    missing = sorted(set(names) - set(model.model_fields))
    assert not missing, f"{model.__name__} lacks {schema} fields {missing}"


def test_values_that_ask_for_nothing():
    assert asks_for_nothing("return_routed_experts", False)
    assert asks_for_nothing("return_routed_experts", None)
    assert asks_for_nothing("image_data", []) and asks_for_nothing("lora_path", None)
    assert asks_for_nothing("function_call", "none") and asks_for_nothing("beam_width", 1)
    assert not asks_for_nothing("return_routed_experts", True)
    assert not asks_for_nothing("return_routed_experts", 0)  # 0 is not false
    assert not asks_for_nothing("beam_width", True)  # nor true 1
    assert not asks_for_nothing("lora_path", "adapter")
    assert not asks_for_nothing("function_call", {"name": "f"})
    assert all(isinstance(v, tuple) for v in UNSUPPORTED.values())


# --------------------------------------------------------------------------- over HTTP
GEN, CMPL, CHAT = "/generate", "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
BASE = {
    GEN: {"text": "hi", "sampling_params": {"max_new_tokens": 2}},
    CMPL: {"prompt": "hi", "max_tokens": 2},
    CHAT: {"messages": USER, "max_tokens": 2},
}

# (route, where the field goes: None = top level, else a nested object's key, field,
#  a value that asks for nothing, a value that asks for something)
CASES = [
    (GEN, None, "return_routed_experts", False, True),
    (GEN, None, "lora_path", None, "my-adapter"),
    (GEN, None, "image_data", [], ["http://x/cat.png"]),
    (GEN, None, "return_hidden_states", False, True),
    (GEN, "sampling_params", "stop_regex", [], ["a+"]),
    (GEN, "sampling_params", "beam_width", 1, 4),
    (CMPL, None, "return_routed_experts", False, True),
    (CMPL, None, "suffix", "", " end"),
    (CMPL, None, "stop_regex", None, "x+"),
    (CHAT, None, "return_routed_experts", False, True),
    (CHAT, None, "functions", [], [{"name": "f", "parameters": {}}]),  # tools' old name
    (CHAT, None, "function_call", "auto", {"name": "f"}),
    (CHAT, None, "store", False, True),
    (CHAT, "stream_options", "include_obfuscation", False, True),
]


def _body(server, route, nested, field, value):
    body = {**BASE[route], **({} if route == GEN else {"model": model_name(server)})}
    if nested is None:
        body[field] = value
    elif nested == "stream_options":
        body.update(stream=True, stream_options={"include_usage": True, field: value})
    else:
        body[nested] = {**body[nested], field: value}
    return body


@pytest.mark.parametrize(
    "route,nested,field,default,other", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES]
)
def test_unsupported_field_at_its_default_is_accepted_otherwise_a_400_naming_it(
    fake_server, route, nested, field, default, other
):
    ok = requests.post(
        fake_server.url + route, json=_body(fake_server, route, nested, field, default), timeout=60
    )
    assert ok.status_code == 200, ok.text
    bad = requests.post(
        fake_server.url + route, json=_body(fake_server, route, nested, field, other), timeout=60
    )
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    # a nested field's param also names the union member pydantic tried, e.g.
    # sampling_params.GenerateSamplingParams.stop_regex
    assert error["param"].split(".")[-1] == field
    assert error["param"].startswith(nested or field)
    assert field in error["message"] and "not supported" in error["message"]


@pytest.mark.parametrize(
    "route,nested", [(GEN, None), (GEN, "sampling_params"), (CMPL, None), (CHAT, None)]
)
@pytest.mark.parametrize("value", [None, True])
def test_a_field_nobody_defines_is_a_400_naming_it(fake_server, route, nested, value):
    r = requests.post(
        fake_server.url + route,
        json=_body(fake_server, route, nested, "no_such_field", value),
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert "no_such_field" in r.json()["error"]["param"]


def test_bench_serving_bodies_are_accepted(fake_server):
    """What sglang 0.5.10.post1's bench_serving sends (--backend sglang, sglang-oai,
    sglang-oai-chat), field for field."""
    model = model_name(fake_server)
    bodies = {
        GEN: {
            "text": "hi",
            "sampling_params": {"temperature": 0.0, "max_new_tokens": 2, "ignore_eos": True},
            "stream": True,
            "lora_path": None,
            "return_logprob": False,
            "return_routed_experts": False,
            "logprob_start_len": -1,
        },
        CMPL: {
            "model": model,
            "prompt": "hi",
            "best_of": 1,
            "max_tokens": 2,
            "stream": True,
            "temperature": 0.0,
            "ignore_eos": True,
        },
        CHAT: {
            "model": model,
            "messages": USER,
            "max_completion_tokens": 2,
            "stream": True,
            "temperature": 0.0,
            "ignore_eos": True,
        },
    }
    for route, body in bodies.items():
        r = requests.post(fake_server.url + route, json=body, timeout=60)
        assert r.status_code == 200, (route, r.text)
