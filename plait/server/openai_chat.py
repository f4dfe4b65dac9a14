"""``/v1/chat/completions``: messages (and tools) rendered through the checkpoint's chat
template, then the steps every OpenAI route shares (:mod:`plait.server.openai_common`); the
output shaped into reasoning, content and tool calls (:mod:`plait.server.chat_output`);
logprobs carry each token's own bytes."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import jinja2
from fastapi import APIRouter, Request

from plait.server.chat_output import ChatShape
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
from plait.server.reasoning import ReasoningParser
from plait.server.server_args import ServerArgs
from plait.server.token_bytes import token_bytes
from plait.server.tools.constrained import structural_tag
from plait.server.tools.parsers import ToolParser, get_parser
from plait.server.tools.prompt import template_messages
from plait.server.tools.request import ToolPlan, plan_tools, template_of

router = APIRouter(prefix="/v1")


# --------------------------------------------------------------------------- chat
async def _render_chat(
    body: ChatCompletionRequest, client: EngineClient, plan: ToolPlan | None, configured: str | None
) -> tuple[str, list[int]]:
    """The prompt's text and token ids."""
    messages = []
    for m in body.messages:
        msg = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            msg["content"] = "".join(part.text for part in m.content)
        messages.append(msg)
    with invalid_request():  # before rendering: the template runs over all of it
        check_text_length(client, sum(len(m.get("content") or "") for m in messages), "messages")
    template = template_of(client.tokenizer)
    aware = "tools" in template
    parser: ToolParser | None = plan.parser if plan else None
    if parser is None and not aware:  # earlier calls, written in the syntax Plait prompts for
        parser = get_parser(configured or "hermes")
    messages, tool_kwargs = template_messages(messages, plan, parser, aware)
    kwargs = {**tool_kwargs, **(body.chat_template_kwargs or {})}
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
        return text, await tokenize(client, text, add_special_tokens=False, param="messages")


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
    args: ServerArgs | None = getattr(request.app.state, "args", None)
    configured = args.tool_call_parser if args else None
    plan = plan_tools(body, template_of(client.tokenizer), configured)
    prompt, ids = await _render_chat(body, client, plan, configured)
    shape = ChatShape(
        tools=plan,
        reasoning=(
            ReasoningParser(args.reasoning_parser, prompt)
            if args and args.reasoning_parser and body.separate_reasoning
            else None
        ),
        stream_reasoning=body.stream_reasoning,
    )
    ctx = client.context_length or 0
    limit = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = limit if limit is not None else max(ctx - len(ids), 0)
    sp = sampling_params_of(body, max_tokens, **_constraint(body, plan, client))
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
            client, reqs, head, body, _chat_chunker(client, head, body.logprobs, shape)
        )
    outs = await collect(client, reqs, request)
    choices = []
    for i, out in enumerate(outs):
        meta = out.get("meta_info") or {}
        message, finish = shape.message(out.get("text", ""), finish_reason_str(meta))
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": _chat_logprobs(client, meta) if body.logprobs else None,
                "finish_reason": finish,
            }
        )
    return {
        **head,
        "choices": choices,
        "usage": usage_of(reqs, [o.get("meta_info") or {} for o in outs], body.n),
    }


def _constraint(
    body: ChatCompletionRequest, plan: ToolPlan | None, client: EngineClient
) -> dict[str, Any]:
    """The decoding constraint: constrained tool calls, or ``response_format``'s schema; and
    special tokens kept when the parser's call marker is one (Mistral's ``[TOOL_CALLS]``)."""
    tag = structural_tag(plan) if plan is not None else None
    if tag is not None:
        out: dict[str, Any] = {"structural_tag": tag}
        special = set(getattr(client.tokenizer, "all_special_tokens", ()))
        if body.skip_special_tokens is None and plan.parser.start in special:
            out["skip_special_tokens"] = False
        return out
    schema = response_format_schema(body)
    return {"json_schema": schema} if schema else {}


def _chat_chunker(client: EngineClient, head: dict[str, Any], want_lp: bool, shape: ChatShape):
    streams: dict[int, Any] = {}
    sent_tokens: dict[int, int] = {}

    def chunk(i: int, out: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]] | None:
        meta = out.get("meta_info") or {}
        text = out.get("text", "")
        first = i not in streams
        if first:
            streams[i] = shape.stream()
        fr = finish_reason_str(meta)
        deltas = streams[i].feed(text, fr is not None)
        fr = streams[i].finish_reason(fr)
        lp = None
        if want_lp:
            start = sent_tokens.get(i, 0)
            sent_tokens[i] = len(meta.get("output_token_logprobs") or [])
            lp = _chat_logprobs(client, meta, start)
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
        if not deltas and (fr is not None or (lp and lp["content"])):
            deltas = [{}]
        for k, delta in enumerate(deltas):
            last = k == len(deltas) - 1
            chunks.append(
                {
                    **head,
                    "choices": [
                        {
                            "index": i,
                            "delta": delta,
                            "logprobs": lp if k == 0 else None,
                            "finish_reason": fr if last else None,
                        }
                    ],
                }
            )
        return chunks

    return chunk
