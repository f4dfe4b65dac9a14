"""Messages and tools as the chat template receives them.

A tool-aware template (one that reads ``tools``) gets OpenAI's tools as they are and each
assistant call's ``arguments`` as an object (transformers' convention: templates write them
with ``tojson``). A template that knows no tools (SmolLM2's) would drop them silently, so
Plait writes them itself: a system message listing the functions and the call syntax of the
parser, earlier calls written in that syntax in the assistant's content, and tool results as
user turns wrapped in ``<tool_response>``.
"""

from __future__ import annotations

import json
from typing import Any

from plait.server.protocol import APIError
from plait.server.tools.parsers import ToolCall, ToolParser
from plait.server.tools.request import ToolPlan

_INSTRUCTIONS = (
    "You can call functions. The functions, as JSON schemas:\n{tools}\n\n"
    "To call a function, reply with the call written exactly like this example:\n{example}\n"
    "Put the function's arguments, as a JSON object, in place of the example's."
)


def template_messages(
    messages: list[dict[str, Any]],
    plan: ToolPlan | None,
    parser: ToolParser | None,
    aware: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(messages, extra template kwargs)`` for ``apply_chat_template``; ``aware``: the
    template renders tools itself (else ``parser`` writes them)."""
    calls = [_calls_of(i, m) for i, m in enumerate(messages)]
    if aware or parser is None:
        out = [
            {**m, "tool_calls": [_with_object_args(c) for c in m["tool_calls"]]} if cs else m
            for m, cs in zip(messages, calls)
        ]
        return out, ({"tools": plan.tools} if plan is not None else {})
    out = [_plain(m, cs, parser) for m, cs in zip(messages, calls)]
    if plan is not None:
        out = _with_tool_prompt(out, plan, parser)
    return out, {}


def _calls_of(i: int, m: dict[str, Any]) -> list[ToolCall]:
    raw = m.get("tool_calls")
    if not raw:
        return []
    if m.get("role") != "assistant" or not isinstance(raw, list):
        raise APIError(f"messages[{i}].tool_calls: only an assistant's list", param="messages")
    out = []
    for j, c in enumerate(raw):
        f = c.get("function") if isinstance(c, dict) else None
        where = f"messages[{i}].tool_calls[{j}].function"
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise APIError(f"{where} must be an object with a name", param="messages")
        args = f.get("arguments", "{}")
        try:
            parsed = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise APIError(f"{where}.arguments must be a JSON object", param="messages")
        out.append(ToolCall(name=f["name"], arguments=json.dumps(parsed, ensure_ascii=False)))
    return out


def _with_object_args(call: dict[str, Any]) -> dict[str, Any]:
    f = call["function"]
    args = f.get("arguments", "{}")
    return {
        **call,
        "function": {**f, "arguments": json.loads(args) if isinstance(args, str) else args},
    }


def _plain(m: dict[str, Any], calls: list[ToolCall], parser: ToolParser) -> dict[str, Any]:
    """One message a tool-unaware template can render."""
    if m.get("role") == "tool":
        body = m.get("content") or ""
        return {"role": "user", "content": f"<tool_response>\n{body}\n</tool_response>"}
    if calls:
        text = m.get("content") or ""
        written = parser.render(calls)
        rest = {k: v for k, v in m.items() if k not in ("tool_calls", "content")}
        return {**rest, "content": f"{text}\n{written}" if text else written}
    return m


def _with_tool_prompt(
    messages: list[dict[str, Any]], plan: ToolPlan, parser: ToolParser
) -> list[dict[str, Any]]:
    first = plan.named or next(iter(plan.schemas))
    example = parser.render([ToolCall(name=first, arguments='{"argument": "value"}')])
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in plan.tools)
    prompt = _INSTRUCTIONS.format(tools=listing, example=example)
    if messages and messages[0].get("role") == "system":
        head = messages[0]
        return [{**head, "content": f"{head.get('content') or ''}\n\n{prompt}"}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]
