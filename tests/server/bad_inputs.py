"""Bad requests every server must answer with HTTP 400 and an OpenAI-style error body, shared
by the fake-engine and real-model suites. ``{model}`` is replaced by the served model name and
``{ctx}`` by the context length."""

from __future__ import annotations

import json
from typing import Any

import requests

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GENERATE = "/generate"
USER = [{"role": "user", "content": "hi"}]

# (case id, path, body: dict or raw str, expected "param" or None when any param is fine)
CASES: list[tuple[str, str, Any, str | None]] = [
    ("malformed-json-generate", GENERATE, '{"text": "hi", ', None),
    ("malformed-json-chat", CHAT, '{"model": ', None),
    ("malformed-json-completions", COMPLETIONS, "not json at all", None),
    ("json-not-an-object", GENERATE, "[1, 2, 3]", None),
    ("empty-body", CHAT, "", None),
    ("wrong-type-text", GENERATE, {"text": 5}, None),
    ("wrong-type-messages", CHAT, {"model": "{model}", "messages": "hi"}, "messages"),
    (
        "wrong-type-max-tokens",
        COMPLETIONS,
        {"model": "{model}", "prompt": "hi", "max_tokens": "many"},
        "max_tokens",
    ),
    (
        "wrong-type-temperature",
        GENERATE,
        {"text": "hi", "sampling_params": {"temperature": "hot"}},
        None,
    ),
    (
        "negative-max-new-tokens",
        GENERATE,
        {"text": "hi", "sampling_params": {"max_new_tokens": -1}},
        None,
    ),
    (
        "negative-max-tokens",
        COMPLETIONS,
        {"model": "{model}", "prompt": "hi", "max_tokens": -1},
        "max_tokens",
    ),
    (
        "negative-max-completion-tokens",
        CHAT,
        {"model": "{model}", "messages": USER, "max_completion_tokens": -5},
        "max_completion_tokens",
    ),
    (
        "over-context-max-new-tokens",
        GENERATE,
        {"text": "hi", "sampling_params": {"max_new_tokens": "{ctx}"}},
        "max_new_tokens",
    ),
    (
        "over-context-max-tokens",
        CHAT,
        {"model": "{model}", "messages": USER, "max_tokens": "{ctx}"},
        "max_tokens",
    ),
    (
        "prompt-longer-than-context",
        GENERATE,
        {"input_ids": "{long_ids}", "sampling_params": {"max_new_tokens": 1}},
        "prompt",
    ),
    (
        "completion-prompt-longer-than-context",
        COMPLETIONS,
        {"model": "{model}", "prompt": "{long_ids}", "max_tokens": 1},
        "prompt",
    ),
    ("unknown-model-chat", CHAT, {"model": "no-such-model", "messages": USER}, "model"),
    ("unknown-model-completions", COMPLETIONS, {"model": "gpt-17", "prompt": "hi"}, "model"),
    (
        "bad-regex-generate",
        GENERATE,
        {"text": "hi", "sampling_params": {"regex": "(unclosed"}},
        "regex",
    ),
    (
        "bad-regex-completions",
        COMPLETIONS,
        {"model": "{model}", "prompt": "hi", "regex": "[a-"},
        "regex",
    ),
    (
        "bad-json-schema",
        CHAT,
        {
            "model": "{model}",
            "messages": USER,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x"}},
        },
        "response_format",
    ),
    ("n-zero-generate", GENERATE, {"text": "hi", "sampling_params": {"n": 0}}, None),
    ("n-zero-chat", CHAT, {"model": "{model}", "messages": USER, "n": 0}, "n"),
    ("n-negative-completions", COMPLETIONS, {"model": "{model}", "prompt": "hi", "n": -1}, "n"),
    (
        "negative-temperature-generate",
        GENERATE,
        {"text": "hi", "sampling_params": {"temperature": -0.5}},
        None,
    ),
    (
        "negative-temperature-chat",
        CHAT,
        {"model": "{model}", "messages": USER, "temperature": -1},
        "temperature",
    ),
    (
        "negative-temperature-completions",
        COMPLETIONS,
        {"model": "{model}", "prompt": "hi", "temperature": -2},
        "temperature",
    ),
    (
        "unknown-sampling-param",
        GENERATE,
        {"text": "hi", "sampling_params": {"temprature": 0.5}},
        None,
    ),
    ("no-prompt", GENERATE, {"sampling_params": {"max_new_tokens": 1}}, "text"),
    ("both-prompts", GENERATE, {"text": "hi", "input_ids": [1, 2]}, "text"),
    ("token-id-out-of-vocab", GENERATE, {"input_ids": [10**9]}, "input_ids"),
    ("empty-messages", CHAT, {"model": "{model}", "messages": []}, "messages"),
    (
        "bad-role",
        CHAT,
        {"model": "{model}", "messages": [{"role": "wizard", "content": "hi"}]},
        None,
    ),
    (
        "top-logprobs-without-logprobs",
        CHAT,
        {"model": "{model}", "messages": USER, "top_logprobs": 2},
        "top_logprobs",
    ),
    (
        "too-many-top-logprobs",
        COMPLETIONS,
        {"model": "{model}", "prompt": "hi", "logprobs": 1000},
        "logprobs",
    ),
    ("unknown-field", CHAT, {"model": "{model}", "messages": USER, "temprature": 1}, None),
    ("empty-prompt", COMPLETIONS, {"model": "{model}", "prompt": ""}, "prompt"),
    (
        "logprob-start-out-of-range",
        GENERATE,
        {"text": "hi", "return_logprob": True, "logprob_start_len": -7},
        "logprob_start_len",
    ),
    (
        "logit-bias-out-of-range",
        CHAT,
        {"model": "{model}", "messages": USER, "logit_bias": {"5": 100.5}},
        "logit_bias",
    ),
    (
        "logit-bias-out-of-vocab",
        COMPLETIONS,
        {"model": "{model}", "prompt": "hi", "logit_bias": {"1000000000": 1}},
        "logit_bias",
    ),
    (
        "logit-bias-bad-key",
        GENERATE,
        {"text": "hi", "sampling_params": {"logit_bias": {"five": 1}}},
        "logit_bias",
    ),
    (
        "stream-options-without-stream",
        CHAT,
        {"model": "{model}", "messages": USER, "stream_options": {"include_usage": True}},
        "stream_options",
    ),
]


def _fill(value: Any, subs: dict[str, Any]) -> Any:
    if isinstance(value, str) and value in subs:
        return subs[value]
    if isinstance(value, dict):
        return {k: _fill(v, subs) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, subs) for v in value]
    return value


def send_bad(
    url: str, path: str, body: Any, model: str, ctx: int, headers: dict[str, str] | None = None
) -> requests.Response:
    subs = {"{model}": model, "{ctx}": ctx, "{long_ids}": [100] * (ctx + 5)}
    data = body if isinstance(body, str) else json.dumps(_fill(body, subs))
    return requests.post(
        url + path,
        data=data,
        timeout=60,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def assert_openai_error(
    resp: requests.Response, status: int = 400, param: str | None = None
) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["code"] == status and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err
