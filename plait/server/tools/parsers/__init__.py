"""Tool-call parsers by model family, under SGLang's ``--tool-call-parser`` names.

``detect(template)`` picks the family from a chat template's own call syntax when exactly one
family's marker appears in it; a template that names no tool syntax gets none (the caller
then renders the tools itself, in the ``hermes`` syntax: ``plait.server.tools.prompt``).
"""

from __future__ import annotations

from plait.server.tools.parsers.base import CallDraft, Scan, ToolCall, ToolParser
from plait.server.tools.parsers.hermes import HermesParser, Qwen25Parser
from plait.server.tools.parsers.llama3 import Llama3Parser
from plait.server.tools.parsers.mistral import MistralParser
from plait.server.tools.parsers.pythonic import PythonicParser

PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "qwen25": Qwen25Parser,
    "qwen": Qwen25Parser,
    "llama3": Llama3Parser,
    "mistral": MistralParser,
    "pythonic": PythonicParser,
}

# A marker only one family's template writes -> that family.
_TEMPLATE_MARKERS = {
    "<tool_call>": "hermes",
    "<|python_tag|>": "llama3",
    "[TOOL_CALLS]": "mistral",
    "[func_name1(": "pythonic",
}


def get_parser(name: str) -> ToolParser:
    """The parser called ``name``; ``ValueError`` listing the names otherwise."""
    cls = PARSERS.get(name)
    if cls is None:
        raise ValueError(f"tool_call_parser must be one of {sorted(PARSERS)}, got {name!r}")
    return cls()


def detect(template: str | None) -> str | None:
    """The family whose call syntax ``template`` writes, None if none or several do."""
    found = {fam for marker, fam in _TEMPLATE_MARKERS.items() if marker in (template or "")}
    return found.pop() if len(found) == 1 else None


__all__ = ["PARSERS", "CallDraft", "Scan", "ToolCall", "ToolParser", "detect", "get_parser"]
