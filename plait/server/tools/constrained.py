"""The decoding constraint that makes tool calls parse: an xgrammar structural tag built from
the parser's call syntax and each function's JSON schema.

- ``required`` / a named function: the output is one or more calls (only the named one),
  separated as the family separates them, and nothing else;
- ``auto``: free text until the model writes the family's call-open marker (the trigger);
  from there the call is constrained to a known function's name and arguments valid against
  its schema, then free text again.

Either way a call the parser reads has arguments that parse and validate. JSON whitespace
inside arguments is capped at one character in a row: a small model allowed any whitespace
can loop on newlines until the token limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from plait.server.protocol import APIError
from plait.server.tools.request import ToolPlan


@dataclass(frozen=True, kw_only=True)
class CallSyntax:
    """How one family writes a call around its JSON arguments."""

    head: str  # before the name's JSON string
    args: str  # between the name and the arguments object
    tail: str  # after the arguments object
    trigger: str  # what opens a call in free text (a prefix of head)
    separator: str  # between calls when only calls are written


SYNTAX: dict[str, CallSyntax] = {
    "hermes": CallSyntax(
        head='<tool_call>\n{"name": ',
        args=', "arguments": ',
        tail="}\n</tool_call>",
        trigger="<tool_call>",
        separator="\n",
    ),
    "llama3": CallSyntax(
        head='{"name": ', args=', "parameters": ', tail="}", trigger='{"name": ', separator="; "
    ),
    "mistral": CallSyntax(
        head='[TOOL_CALLS][{"name": ',
        args=', "arguments": ',
        tail="}]",
        trigger="[TOOL_CALLS]",
        separator="",
    ),
}
SYNTAX["qwen25"] = SYNTAX["qwen"] = SYNTAX["hermes"]


def _tag(syntax: CallSyntax, name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "tag",
        "begin": f"{syntax.head}{json.dumps(name)}{syntax.args}",
        "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1},
        "end": syntax.tail,
    }


def structural_tag(plan: ToolPlan) -> str | None:
    """The constraint for ``plan`` as xgrammar structural-tag JSON; None for ``none``."""
    if plan.choice == "none":
        return None
    syntax = SYNTAX.get(plan.parser.name)
    if syntax is None and plan.choice == "auto":
        return None  # pythonic: parsed as written, not constrained (docs/serving.md)
    if syntax is None:
        raise APIError(
            f"tool_choice: calls in the {plan.parser.name} syntax cannot be forced yet; "
            "use tool_choice 'auto' or a JSON call syntax (--tool-call-parser)",
            param="tool_choice",
        )
    names = [plan.named] if plan.named else list(plan.schemas)
    tags = [_tag(syntax, n, plan.schemas[n]) for n in names]
    one = not plan.parallel
    if plan.choice == "auto":
        fmt = {
            "type": "triggered_tags",
            "triggers": [syntax.trigger],
            "tags": tags,
            "at_least_one": False,
            "stop_after_first": one,
        }
    else:
        fmt = {
            "type": "tags_with_separator",
            "tags": tags,
            "separator": syntax.separator,
            "at_least_one": True,
            "stop_after_first": one,
        }
    return json.dumps({"type": "structural_tag", "format": fmt})
