"""A chat request's tools, checked and resolved into a ``ToolPlan``: which parser reads the
calls, which tools the prompt shows, and what decoding must respect.

Checks (each a 400 naming the parameter and the function): tool names (OpenAI's
``[A-Za-z0-9_.-]{1,64}``, no duplicates), ``parameters`` a valid JSON schema of an object that
xgrammar can compile, ``tool_choice`` naming a function that exists, and no second decoding
constraint (``response_format``, ``regex``, ...) beside constrained tool calls.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from plait.server.protocol import APIError, ChatCompletionRequest
from plait.server.tools.parsers import ToolParser, detect, get_parser

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_EMPTY_OBJECT = {"type": "object", "properties": {}}


@dataclass(frozen=True, kw_only=True)
class ToolPlan:
    parser: ToolParser
    tools: list[dict[str, Any]]  # as OpenAI sends them, for the chat template
    schemas: dict[str, dict[str, Any]]  # function name -> its arguments' JSON schema
    choice: str  # "none", "auto", "required" or "named"
    named: str | None
    parallel: bool

    @property
    def parses(self) -> bool:
        return self.choice != "none"

    @property
    def max_calls(self) -> int | None:
        return None if self.parallel else 1


def template_of(tokenizer: Any) -> str:
    t = getattr(tokenizer, "chat_template", None)
    return "\n".join(t.values()) if isinstance(t, dict) else (t or "")


def resolve_parser(configured: str | None, template: str) -> ToolParser:
    """``--tool-call-parser``, else the family the template writes, else ``hermes`` for a
    template that knows no tools (Plait then renders them: ``tools.prompt``). A tool-aware
    template whose syntax is not recognised is a 400: guessing would return no calls."""
    if configured:
        return get_parser(configured)
    found = detect(template)
    if found:
        return get_parser(found)
    if "tools" not in template:
        return get_parser("hermes")
    raise APIError(
        "tools: the chat template writes tool calls in a syntax Plait does not recognise; "
        "start the server with --tool-call-parser",
        param="tools",
    )


def plan_tools(
    body: ChatCompletionRequest, template: str, configured: str | None
) -> ToolPlan | None:
    """The plan for ``body``'s tools; None when it sends none."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError("tool_choice requires tools", param="tool_choice")
        return None
    schemas = _schemas(body)
    named = None
    if choice is None:
        choice = "auto"
    elif not isinstance(choice, str):
        named, choice = choice.function.name, "named"
        if named not in schemas:
            raise APIError(
                f"tool_choice names function {named!r}, not in tools", param="tool_choice"
            )
    if choice != "none":
        _check_single_constraint(body)
    return ToolPlan(
        parser=resolve_parser(configured, template),
        tools=[t.model_dump(exclude_none=True) for t in body.tools],
        schemas=schemas,
        choice=choice,
        named=named,
        parallel=body.parallel_tool_calls,
    )


def _schemas(body: ChatCompletionRequest) -> dict[str, dict[str, Any]]:
    import jsonschema
    import xgrammar as xgr

    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(body.tools or []):
        f = tool.function
        param = f"tools[{i}].function"
        if not _NAME.fullmatch(f.name):
            raise APIError(
                f"{param}.name {f.name!r} must match [A-Za-z0-9_.-]{{1,64}}", param=param
            )
        if f.name in out:
            raise APIError(f"{param}.name: function {f.name!r} is defined twice", param=param)
        schema = f.parameters if f.parameters is not None else _EMPTY_OBJECT
        where = f"{param}.parameters of function {f.name!r}"
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise APIError(
                f"{where} is not a valid JSON schema: {e.message}", param=param
            ) from None
        if schema.get("type", "object") != "object":
            raise APIError(f"{where} must describe an object (type: object)", param=param)
        try:  # the engine compiles it again with the tokenizer; this names the function
            xgr.Grammar.from_json_schema(json.dumps(schema))
        except RuntimeError as e:
            raise APIError(f"{where} is not supported: {e}", param=param) from None
        out[f.name] = schema
    return out


def _check_single_constraint(body: ChatCompletionRequest) -> None:
    rf = body.response_format
    others = {
        "response_format": rf is not None and rf.type != "text",
        "regex": body.regex is not None,
        "json_schema": body.json_schema is not None,
        "ebnf": body.ebnf is not None,
    }
    for name, given in others.items():
        if given:
            raise APIError(
                f"{name} cannot be combined with tools unless tool_choice is 'none' "
                "(tool calls are constrained decoding of their own)",
                param=name,
            )
