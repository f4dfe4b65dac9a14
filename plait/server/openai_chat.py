"""``/v1/chat/completions``: messages rendered through the checkpoint's chat template, then
the steps every OpenAI route shares (:mod:`plait.server.openai_common`); logprobs carry each
token's own bytes."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import jinja2
from fastapi import APIRouter, Request

from plait.server.engine_client import EngineClient
from plait.server.openai_common import (
    check_model,
    check_stream_options,
    client_of,
    engine_requests,
    response_format_schema,
    sampling_params_of,
    stream_response,
    usage_of,
)
from plait.server.protocol import APIError, ChatCompletionRequest
from plait.server.submit import (
    check_text_length,
    collect,
    finish_reason_str,
    invalid_request,
    tokenize,
)
from plait.server.token_bytes import token_bytes

router = APIRouter(prefix="/v1")


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
    client = client_of(request)
    check_model(client, body.model)
    check_stream_options(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs requires logprobs=true", param="top_logprobs")
    ids = await _render_chat(body, client)
    ctx = client.context_length or 0
    limit = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = limit if limit is not None else max(ctx - len(ids), 0)
    schema = response_format_schema(body)
    sp = sampling_params_of(body, max_tokens, **({"json_schema": schema} if schema else {}))
    rid = body.rid or f"chatcmpl-{uuid.uuid4().hex}"
    reqs = await engine_requests(
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
        return await stream_response(
            client, reqs, head, body, _chat_chunker(client, head, body.logprobs)
        )
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
        "usage": usage_of(reqs, [o.get("meta_info") or {} for o in outs], body.n),
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
