"""The OpenAPI schema as the server really answers, so a schema-driven client or fuzzer
(schemathesis) can make requests that reach the engine, and can check every answer.

FastAPI's generated schema is corrected in four ways:

- ``model`` on the OpenAI routes is an enum of the names ``check_model`` accepts: the served
  name, the model path, SGLang's ``default``, and with LoRA each loaded adapter's name and its
  ``base:adapter`` forms (read from the engine at each ``/openapi.json`` request, since
  adapters load and unload at run time).
- Every route declares its error answers (``{"error": {...}}``, ``protocol.error_body``): 400,
  404, 413, 429 and 503 (and 401 with ``--api-key``, and 504 on the generation routes with
  ``--request-timeout``); FastAPI's 422 is dropped since request validation errors are
  answered as 400.
- ``/health``, ``/health_generate``, ``/flush_cache`` answer ``text/plain`` and ``/metrics``
  Prometheus' text format, not JSON; the generation routes may answer ``text/event-stream``.
- Prompts, token ids and ``logit_bias`` keys are declared as the server checks them.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from plait.core.sampling_params import MAX_LOGIT_BIAS
from plait.server.protocol import _ERROR_TYPES

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"type": "integer"},
            },
        }
    },
}
ERROR_STATUSES = (400, 404, 413, 429, 503)
TEXT_ROUTES = {  # path -> the content type of its answers (2xx and the bare 503 of /health)
    "/health": "text/plain",
    "/health_generate": "text/plain",
    "/flush_cache": "text/plain",
    "/metrics": CONTENT_TYPE_LATEST.split("; charset")[0],  # Prometheus' text format
}
STREAM_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
MODEL_ROUTES = ("CompletionRequest", "ChatCompletionRequest")


def served_models(name: str, path: str, adapters: list[str]) -> list[str]:
    """The ``model`` values ``openai_common.check_model`` accepts, in a stable order."""
    bases = list(dict.fromkeys([name, path, "default"]))
    return bases + adapters + [f"{b}:{a}" for b in bases for a in adapters]


def build_schema(
    app: FastAPI, models: list[str], vocab_size: int, api_key: bool, timeout: bool = False
) -> dict[str, Any]:
    """FastAPI's schema for ``app`` with the corrections above (a new dict each call);
    ``timeout``: ``--request-timeout`` is set, so the generation routes may answer 504."""
    schema = copy.deepcopy(app.openapi())
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps["ErrorResponse"] = ERROR_SCHEMA
    comps.pop("HTTPValidationError", None)
    comps.pop("ValidationError", None)
    for name in MODEL_ROUTES:
        props = comps.get(name, {}).get("properties", {})
        if "model" in props:
            props["model"] = {**props["model"], "enum": models}
    _prompt_rules(comps, vocab_size)
    statuses = (*ERROR_STATUSES, 401) if api_key else ERROR_STATUSES
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path in STREAM_ROUTES:  # "stream": true answers server-sent events
                ok = responses.setdefault("200", {"description": "Successful Response"})
                ok.setdefault("content", {})["text/event-stream"] = {"schema": {"type": "string"}}
            if path in TEXT_ROUTES:
                ok = responses.setdefault("200", {"description": "Successful Response"})
                ok["content"] = {TEXT_ROUTES[path]: {"schema": {"type": "string"}}}
            for status in (*statuses, 504) if timeout and path in STREAM_ROUTES else statuses:
                responses[str(status)] = _error_response(status, path)
    return schema


def _error_response(status: int, path: str) -> dict[str, Any]:
    description = _ERROR_TYPES.get(status, "error")
    if status == 503 and path in ("/health", "/health_generate"):
        # health probes answer a bare 503 (no body): a load balancer reads only the status
        return {"description": "unhealthy", "content": {"text/plain": {"schema": {}}}}
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def _prompt_field(s: dict[str, Any], vocab_size: int) -> None:
    """Non-empty strings and lists; token ids in ``[0, vocab_size)``."""
    for alt in s.get("anyOf", [s]):
        if alt.get("type") == "string":
            alt["minLength"] = 1
        elif alt.get("type") == "integer":
            alt.update(minimum=0, maximum=vocab_size - 1)
        elif alt.get("type") == "array":
            alt["minItems"] = 1
            _prompt_field(alt.get("items", {}), vocab_size)


def _prompt_rules(comps: dict[str, Any], vocab_size: int) -> None:
    """What the server checks of a prompt, stated: it is non-empty, its token ids are the
    vocabulary's, ``/generate`` takes exactly one of ``text`` and ``input_ids`` (null is
    absent), stop token ids are the vocabulary's and ``logit_bias`` maps token ids (digits)
    to biases in [-100, 100]."""
    for model, field in (
        ("CompletionRequest", "prompt"),
        ("GenerateRequest", "text"),
        ("GenerateRequest", "input_ids"),
    ):
        prop = comps.get(model, {}).get("properties", {}).get(field)
        if prop is not None:
            _prompt_field(prop, vocab_size)
    if "GenerateRequest" in comps:
        not_null = {"not": {"type": "null"}}
        comps["GenerateRequest"]["oneOf"] = [
            {"required": [f], "properties": {f: not_null}} for f in ("text", "input_ids")
        ]
    for model in ("CompletionRequest", "ChatCompletionRequest", "GenerateSamplingParams"):
        props = comps.get(model, {}).get("properties", {})
        for alt in props.get("stop_token_ids", {}).get("anyOf", []):
            if alt.get("type") == "array":
                alt["items"] = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
        for alt in props.get("logit_bias", {}).get("anyOf", []):
            if alt.get("type") == "object":
                alt["propertyNames"] = {"pattern": "^[0-9]+$"}
                bias = {"type": "number", "minimum": -MAX_LOGIT_BIAS, "maximum": MAX_LOGIT_BIAS}
                alt["additionalProperties"] = bias


def install(app: FastAPI) -> None:
    """Serve the corrected schema at ``app.openapi_url`` (FastAPI's own route replaced, so
    ``/docs`` shows it too)."""
    url = app.openapi_url
    if url is None:
        return
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != url]

    @app.get(url, include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        c = request.app.state.client
        adapters: list[str] = []
        if c.lora_enabled:
            adapters = sorted((await c.server_info()).get("lora_adapters", {}))
        models = served_models(c.model_name, c.model_path, adapters)
        args = request.app.state.args
        timeout = args.request_timeout is not None
        return JSONResponse(
            build_schema(request.app, models, c.vocab_size, bool(args.api_key), timeout)
        )
