"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Both generation routes reduce to the same steps: prompts -> token ids, OpenAI fields ->
validated SGLang sampling params, n expanded into engine requests (choice index =
prompt * n + sample), then either one JSON body or an SSE stream ending ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from plait.core.messages import GenerateReq
from plait.server.engine_client import EngineClient
from plait.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    _SamplingFields,
)
from plait.server.submit import (
    SSE_DONE,
    check_text_length,
    collect,
    finish_reason_str,
    invalid_request,
    merge_streams,
    prepare,
    sse,
    tokenize,
)
from plait.server.token_bytes import token_bytes

router = APIRouter(prefix="/v1")

# The core's parameter names -> the OpenAI names the client actually sent.
_OPENAI_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "input_ids": "prompt",
    "text": "prompt",
}


def _client(request: Request) -> EngineClient:
    return request.app.state.client


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    c = _client(request)
    return {
        "object": "list",
        "data": [
            {
                "id": c.model_name,
                "object": "model",
                "created": int(c.started_at),
                "owned_by": "plait",
                "root": c.model_path,
                "max_model_len": c.context_length,
            }
        ],
    }


def _check_model(client: EngineClient, model: str) -> None:
    if model not in (client.model_name, client.model_path):
        raise APIError(
            f"model {model!r} does not exist; this server serves {client.model_name!r}",
            param="model",
            type="model_not_found",
        )


def _sampling(body: _SamplingFields, max_tokens: int, **extra: Any) -> dict[str, Any]:
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


async def _requests(
    client: EngineClient, rename: dict[str, str], **request: Any
) -> list[GenerateReq]:
    """One core message per choice (index = prompt * n + sample), checked by the core's
    rules (tokenizing off the event loop); errors name OpenAI's parameters (``rename``)."""
    with invalid_request({**_OPENAI_NAMES, **rename}):
        msgs, _ = GenerateReq.batch(**request)
        return await prepare(client, msgs)


def _usage(reqs: list[GenerateReq], metas: list[dict[str, Any]], n: int) -> dict[str, Any]:
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


def _choice_usage(req: GenerateReq, meta: dict[str, Any]) -> dict[str, Any]:
    """One choice's usage so far: its prompt and the tokens it has generated."""
    prompt = int(meta.get("prompt_tokens") or len(req.input_ids))
    completion = int(meta.get("completion_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _check_stream_options(body: _SamplingFields) -> None:
    """``stream_options`` shapes a stream; on a plain response it would be ignored, so it is
    refused (as OpenAI and vLLM do)."""
    if body.stream_options is not None and not body.stream:
        raise APIError("stream_options is only allowed when stream is true", param="stream_options")


def _token_texts(client: EngineClient, entries: list) -> list[str]:
    return client.tokenizer.batch_decode([[e[1]] for e in entries]) if entries else []


# --------------------------------------------------------------------------- completions
def _prompt_field(prompt: Any) -> dict[str, Any]:
    """OpenAI's ``prompt`` (text, token ids, or a list of either) as the core's field."""
    ids = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], str)
    return {"input_ids" if ids else "text": prompt}


def _completion_logprobs(
    client: EngineClient, meta: dict[str, Any], echo: bool, offset: int
) -> dict[str, Any]:
    entries = (meta.get("input_token_logprobs") or [] if echo else []) + (
        meta.get("output_token_logprobs") or []
    )
    tops = (meta.get("input_top_logprobs") or [] if echo else []) + (
        meta.get("output_top_logprobs") or []
    )
    texts = _token_texts(client, entries)
    offsets, pos = [], offset
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    top_out = []
    for i in range(len(entries)):
        row = tops[i] if i < len(tops) else None
        top_out.append(None if not row else {client.tokenizer.decode([e[1]]): e[0] for e in row})
    return {
        "tokens": texts,
        "token_logprobs": [e[0] for e in entries],
        "top_logprobs": top_out,
        "text_offset": offsets,
    }


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    client = _client(request)
    _check_model(client, body.model)
    _check_stream_options(body)
    if body.best_of is not None and body.best_of != body.n:
        raise APIError("best_of must equal n (no server-side ranking)", param="best_of")
    if body.echo and body.stream:
        raise APIError("echo is not supported with stream", param="echo")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    want_lp = body.logprobs is not None
    rid, created = body.rid or f"cmpl-{uuid.uuid4().hex}", int(time.time())
    schema = _response_format_schema(body)
    sp = _sampling(body, max_tokens, **({"json_schema": schema} if schema else {}))
    reqs = await _requests(
        client,
        {},
        **_prompt_field(body.prompt),
        sampling_params=sp,
        rid=rid,
        return_logprob=want_lp,
        top_logprobs_num=body.logprobs or 0,
        logprob_start_len=0 if body.echo and want_lp else -1,
        stream=body.stream,
        bootstrap=body.bootstrap(),
    )
    prompt_texts = (
        [client.tokenizer.decode(r.input_ids) for r in reqs[:: body.n]] if body.echo else None
    )

    def choice(i: int, out: dict[str, Any], text: str, offset: int) -> dict[str, Any]:
        meta = out.get("meta_info") or {}
        return {
            "index": i,
            "text": text,
            "logprobs": _completion_logprobs(client, meta, body.echo, offset) if want_lp else None,
            "finish_reason": finish_reason_str(meta),
        }

    head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
    if body.stream:
        return await _stream(client, reqs, head, body, _completion_chunker(client, head, want_lp))
    outs = await collect(client, reqs, request)
    choices = []
    for i, out in enumerate(outs):
        prefix = prompt_texts[i // body.n] if prompt_texts else ""
        choices.append(choice(i, out, prefix + out.get("text", ""), 0))
    return {
        **head,
        "choices": choices,
        "usage": _usage(reqs, [o.get("meta_info") or {} for o in outs], body.n),
    }


def _completion_chunker(client: EngineClient, head: dict[str, Any], want_lp: bool):
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}

    def chunk(i: int, out: dict[str, Any]) -> dict[str, Any] | None:
        meta = out.get("meta_info") or {}
        text = out.get("text", "")
        delta = text[sent_text.get(i, 0) :]
        sent_text[i] = max(sent_text.get(i, 0), len(text))
        lp = None
        if want_lp:
            entries = meta.get("output_token_logprobs") or []
            start = sent_tokens.get(i, 0)
            sent_tokens[i] = len(entries)
            lp = _completion_logprobs(
                client,
                {
                    "output_token_logprobs": entries[start:],
                    "output_top_logprobs": (meta.get("output_top_logprobs") or [])[start:],
                },
                False,
                sent_text[i] - len(delta),
            )
        fr = finish_reason_str(meta)
        if not delta and fr is None:
            return None
        return {
            **head,
            "choices": [{"index": i, "text": delta, "logprobs": lp, "finish_reason": fr}],
        }

    return chunk


# --------------------------------------------------------------------------- chat
async def _render_chat(body: ChatCompletionRequest, client: EngineClient) -> list[int]:
    messages = []
    for m in body.messages:
        msg = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            msg["content"] = "".join(part.text for part in m.content)
        messages.append(msg)
    with invalid_request():  # before rendering: the template runs over all of it
        check_text_length(client, sum(len(m.get("content") or "") for m in messages), "messages")
    kwargs = dict(body.chat_template_kwargs or {})
    try:
        text = await asyncio.to_thread(
            client.tokenizer.apply_chat_template,
            messages,
            tokenize=False,
            add_generation_prompt=not body.continue_final_message,
            continue_final_message=body.continue_final_message,
            **kwargs,
        )
    except (jinja2.TemplateError, ValueError, TypeError) as e:
        raise APIError(
            f"messages do not fit the model's chat template: {e}", param="messages"
        ) from None
    with invalid_request():
        return await tokenize(client, text, add_special_tokens=False, param="messages")


def _response_format_schema(body: _SamplingFields) -> str | None:
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return json.dumps({"type": "object"})
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise APIError("response_format.json_schema.schema is required", param="response_format")
    return json.dumps(rf.json_schema.schema_)


def _chat_logprobs(client: EngineClient, meta: dict[str, Any], start: int = 0) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: each token's ``bytes`` are its own (``token_bytes``), so a
    token holding part of a UTF-8 character reports that byte, not U+FFFD's three."""
    entries = (meta.get("output_token_logprobs") or [])[start:]
    tops = (meta.get("output_top_logprobs") or [])[start:]
    tb = token_bytes(client.tokenizer)

    def item(entry: Any) -> dict[str, Any]:
        text, raw = tb.entry(entry[1])
        return {"token": text, "logprob": entry[0], "bytes": raw}

    content = []
    for i, e in enumerate(entries):
        row = tops[i] if i < len(tops) and tops[i] else []
        content.append({**item(e), "top_logprobs": [item(x) for x in row]})
    return {"content": content}


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    client = _client(request)
    _check_model(client, body.model)
    _check_stream_options(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs requires logprobs=true", param="top_logprobs")
    ids = await _render_chat(body, client)
    ctx = client.context_length or 0
    limit = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = limit if limit is not None else max(ctx - len(ids), 0)
    schema = _response_format_schema(body)
    sp = _sampling(body, max_tokens, **({"json_schema": schema} if schema else {}))
    rid = body.rid or f"chatcmpl-{uuid.uuid4().hex}"
    reqs = await _requests(
        client,
        {"max_new_tokens": param},
        input_ids=ids,
        sampling_params=sp,
        rid=rid,
        return_logprob=body.logprobs,
        top_logprobs_num=body.top_logprobs or 0,
        stream=body.stream,
        bootstrap=body.bootstrap(),
    )
    head = {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
    }
    if body.stream:
        head = {**head, "object": "chat.completion.chunk"}
        return await _stream(client, reqs, head, body, _chat_chunker(client, head, body.logprobs))
    outs = await collect(client, reqs, request)
    choices = []
    for i, out in enumerate(outs):
        meta = out.get("meta_info") or {}
        choices.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": out.get("text", "")},
                "logprobs": _chat_logprobs(client, meta) if body.logprobs else None,
                "finish_reason": finish_reason_str(meta),
            }
        )
    return {
        **head,
        "choices": choices,
        "usage": _usage(reqs, [o.get("meta_info") or {} for o in outs], body.n),
    }


def _chat_chunker(client: EngineClient, head: dict[str, Any], want_lp: bool):
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}

    def chunk(i: int, out: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]] | None:
        meta = out.get("meta_info") or {}
        text = out.get("text", "")
        first = i not in sent_text
        delta = text[sent_text.get(i, 0) :]
        sent_text[i] = max(sent_text.get(i, 0), len(text))
        lp = None
        if want_lp:
            start = sent_tokens.get(i, 0)
            sent_tokens[i] = len(meta.get("output_token_logprobs") or [])
            lp = _chat_logprobs(client, meta, start)
        fr = finish_reason_str(meta)
        chunks = []
        if first:
            chunks.append(
                {
                    **head,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        if delta or fr is not None or (lp and lp["content"]):
            chunks.append(
                {
                    **head,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"content": delta} if delta else {},
                            "logprobs": lp,
                            "finish_reason": fr,
                        }
                    ],
                }
            )
        return chunks

    return chunk


# --------------------------------------------------------------------------- streaming
async def _stream(
    client: EngineClient,
    reqs: list[GenerateReq],
    head: dict[str, Any],
    body: _SamplingFields,
    chunker: Callable,
) -> StreamingResponse:
    stream = merge_streams(client, reqs)
    try:  # the first output proves the engine accepted every request: errors stay HTTP 400s
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)

    async def events() -> AsyncIterator[str]:
        last: dict[int, dict[str, Any]] = {}
        try:
            item = first
            while item is not None:
                i, out = item
                last[i] = out.get("meta_info") or {}
                result = chunker(i, out)
                for c in [] if result is None else result if isinstance(result, list) else [result]:
                    if continuous:  # this choice's counts so far, as SGLang and vLLM send
                        c["usage"] = _choice_usage(reqs[i], last[i])
                    yield sse(c)
                item = await anext(stream, None)
        except APIError as e:
            yield sse(e.body())
        finally:
            await stream.aclose()
        if include_usage:
            metas = [last.get(i, {}) for i in range(len(reqs))]
            yield sse({**head, "choices": [], "usage": _usage(reqs, metas, body.n)})
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream")
