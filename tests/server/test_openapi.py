"""The OpenAPI schema states what the server does (plait.server.openapi): the served model
names, the error answers of every route, the text answers of the admin routes; and ``model``
accepts the served name, its path and SGLang's ``default``."""

from __future__ import annotations

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from plait.server.openapi import ERROR_STATUSES, served_models


@pytest.fixture(scope="module")
def schema(fake_server) -> dict:
    return fake_server.get("/openapi.json").json()


def test_served_models_lists_bases_adapters_and_base_adapter_forms():
    assert served_models("m", "/p/m", ["a"]) == [
        "m",
        "/p/m",
        "default",
        "a",
        "m:a",
        "/p/m:a",
        "default:a",
    ]
    assert served_models("m", "m", []) == ["m", "default"]


def test_model_fields_are_an_enum_of_the_served_names(schema, fake_server):
    name = fake_server.get("/v1/models").json()["data"][0]["id"]
    comps = schema["components"]["schemas"]
    for request in ("CompletionRequest", "ChatCompletionRequest"):
        enum = comps[request]["properties"]["model"]["enum"]
        assert enum == [name, fake_server.model_path, "default"], (request, enum)


def test_every_route_declares_its_error_answers(schema):
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, ops in schema["paths"].items():
        for op in ops.values():
            responses = op["responses"]
            assert "422" not in responses, path  # validation errors are answered as 400
            assert "504" not in responses, path  # only with --request-timeout
            for status in ERROR_STATUSES:
                content = responses[str(status)]["content"]
                if status == 503 and path.startswith("/health"):
                    assert "text/plain" in content
                else:
                    assert content["application/json"]["schema"] == error, (path, status)


@pytest.mark.parametrize(
    "method,path,media",
    [
        ("get", "/health", "text/plain"),
        ("get", "/metrics", CONTENT_TYPE_LATEST.split("; charset")[0]),
        ("post", "/flush_cache", "text/plain"),
    ],
)
def test_text_routes_declare_and_answer_their_content_type(
    schema, fake_server, method, path, media
):
    assert list(schema["paths"][path][method]["responses"]["200"]["content"]) == [media]
    resp = getattr(fake_server, method)(path)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith(media), resp.headers


def test_streams_are_declared_as_server_sent_events(schema, fake_server):
    for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        content = schema["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}, path
    body = {"model": "default", "prompt": "hi", "max_tokens": 1, "stream": True}
    resp = fake_server.post("/v1/completions", json=body)
    assert resp.headers["content-type"].startswith("text/event-stream")


def test_an_error_answer_matches_the_declared_error_schema(schema, fake_server):
    resp = fake_server.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert resp.status_code == 400
    err = resp.json()["error"]
    props = schema["components"]["schemas"]["ErrorResponse"]["properties"]["error"]
    assert set(props["required"]) <= set(err) and err["param"] == "model"


def test_model_default_and_the_path_are_the_served_model(fake_server):
    for model in ("default", fake_server.model_path):
        resp = fake_server.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == model
        body = {"model": model, "prompt": "hi", "max_tokens": 2}
        resp = fake_server.post("/v1/completions", json=body)
        assert resp.status_code == 200, resp.text


def test_prompt_rules_are_declared_as_the_server_checks_them(schema, fake_server):
    vocab = fake_server.get("/get_model_info").json()["vocab_size"]
    comps = schema["components"]["schemas"]
    ids = next(a for a in comps["GenerateRequest"]["properties"]["input_ids"]["anyOf"])
    assert ids["minItems"] == 1 and ids["items"]["maximum"] == vocab - 1
    prompt = comps["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert {"type": "string", "minLength": 1} in prompt
    bias = next(
        a for a in comps["CompletionRequest"]["properties"]["logit_bias"]["anyOf"] if "type" in a
    )
    assert bias["additionalProperties"]["maximum"] == 100
    # the bounds are the server's: the last token id is served, the next one refused
    for token, status in ((vocab - 1, 200), (vocab, 400)):
        body = {"input_ids": [token], "sampling_params": {"max_new_tokens": 1}}
        assert fake_server.post("/generate", json=body).status_code == status
