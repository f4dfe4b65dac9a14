"""What the OpenAI routes share: the request's fields as the core's sampling params and
messages, the model-name check, usage counting, and the SSE stream every streaming route
returns (``data: [DONE]`` last, errors after the first output as an error event)."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable

from fastapi import Request

from plait.core.messages import GenerateReq
from plait.server.engine_client import EngineClient
from plait.server.protocol import APIError, _SamplingFields
from plait.server.sse import SSE_DONE, SSEResponse, sse
from plait.server.submit import invalid_request, merge_streams, prepare

# The core's parameter names -> the OpenAI names the client actually sent.
OPENAI_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "input_ids": "prompt",
    "text": "prompt",
}


def client_of(request: Request) -> EngineClient:
    return request.app.state.client


def check_model(client: EngineClient, model: str) -> str | None:
    """The LoRA adapter ``model`` names (None: the base model). The base is its served name,
    its path or SGLang's ``default``. With adapters enabled, ``model`` is the base,
    ``base:adapter`` (SGLang's form) or an adapter's name, which the engine checks (400
    naming an unknown one); without, anything but the base is a 400."""
    bases = (client.model_name, client.model_path, "default")  # SGLang's name for "the base"
    if model in bases:
        return None
    if client.lora_enabled:
        base, sep, adapter = model.partition(":")
        return adapter if sep and base in bases and adapter else model
    if model not in bases:
        raise APIError(
            f"model {model!r} does not exist; this server serves {client.model_name!r}",
            param="model",
            type="model_not_found",
        )


def sampling_params_of(body: _SamplingFields, max_tokens: int, **extra: Any) -> dict[str, Any]:
    """OpenAI's fields as the core's sampling params (checked by the core with the rest)."""
    return {
        "max_new_tokens": max_tokens,
        "min_new_tokens": body.min_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "n": body.n,
        "stop": body.stop,
        "seed": body.seed,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
        "ignore_eos": body.ignore_eos,
        "skip_special_tokens": body.skip_special_tokens,
        "stop_token_ids": body.stop_token_ids,
        "no_stop_trim": body.no_stop_trim,
        "regex": body.regex,
        "json_schema": body.json_schema,
        "ebnf": body.ebnf,
        "logit_bias": body.logit_bias,
        **extra,
    }


async def engine_requests(
    client: EngineClient, rename: dict[str, str], **request: Any
) -> list[GenerateReq]:
    """One core message per choice (index = prompt * n + sample), checked by the core's
    rules (tokenizing off the event loop); errors name OpenAI's parameters (``rename``)."""
    with invalid_request({**OPENAI_NAMES, **rename}):
        msgs, _ = GenerateReq.batch(**request)
        return await prepare(client, msgs)


def usage_of(reqs: list[GenerateReq], metas: list[dict[str, Any]], n: int) -> dict[str, Any]:
    # A prompt is counted once, whatever n is; every choice's tokens are counted.
    prompt = sum(
        int(m.get("prompt_tokens") or len(r.input_ids)) for r, m in list(zip(reqs, metas))[::n]
    )
    cached = sum(int(m.get("cached_tokens") or 0) for m in metas[::n])
    completion = sum(int(m.get("completion_tokens") or 0) for m in metas)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def choice_usage(req: GenerateReq, meta: dict[str, Any]) -> dict[str, Any]:
    """One choice's usage so far: its prompt and the tokens it has generated."""
    prompt = int(meta.get("prompt_tokens") or len(req.input_ids))
    completion = int(meta.get("completion_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def check_stream_options(body: _SamplingFields) -> None:
    """``stream_options`` shapes a stream; on a plain response it would be ignored, so it is
    refused (as OpenAI and vLLM do)."""
    if body.stream_options is not None and not body.stream:
        raise APIError("stream_options is only allowed when stream is true", param="stream_options")


def token_texts(client: EngineClient, entries: list) -> list[str]:
    return client.tokenizer.batch_decode([[e[1]] for e in entries]) if entries else []


def response_format_schema(body: _SamplingFields) -> str | None:
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return json.dumps({"type": "object"})
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise APIError("response_format.json_schema.schema is required", param="response_format")
    return json.dumps(rf.json_schema.schema_)


# --------------------------------------------------------------------------- streaming
async def stream_response(
    client: EngineClient,
    reqs: list[GenerateReq],
    head: dict[str, Any],
    body: _SamplingFields,
    chunker: Callable,
) -> SSEResponse:
    stream = merge_streams(client, reqs)
    try:  # the first output proves the engine accepted every request: errors stay HTTP 400s
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)

    async def events() -> AsyncIterator[bytes]:
        last: dict[int, dict[str, Any]] = {}
        try:
            item = first
            while item is not None:
                i, out = item
                last[i] = out.get("meta_info") or {}
                result = chunker(i, out)
                chunks = [] if result is None else result if isinstance(result, list) else [result]
                if continuous:  # this choice's counts so far, as SGLang and vLLM send
                    for c in chunks:
                        c["usage"] = choice_usage(reqs[i], last[i])
                if chunks:  # one output's chunks (role, then deltas): one send
                    yield b"".join(map(sse, chunks))
                item = await anext(stream, None)
        except APIError as e:
            yield sse(e.body())
        finally:
            await stream.aclose()
        if include_usage:
            metas = [last.get(i, {}) for i in range(len(reqs))]
            yield sse({**head, "choices": [], "usage": usage_of(reqs, metas, body.n)})
        yield SSE_DONE

    return SSEResponse(events())
