"""API speculative execution: ``@function(num_api_spec_tokens=N)``, SGLang's way of serving
several ``gen`` calls of a program from one request.

The first ``gen`` asks for at least N tokens with its stop strings lifted; each ``gen`` then
takes its part of that text, up to its earliest stop string (or, when none appears, its
``max_tokens`` in characters, as SGLang counts). Text the program appends in between must be
what the model wrote next, else the speculation is dropped and the next ``gen`` asks again. A
program whose text follows the model's pattern (a filled-in form) so costs one prompt instead
of one per ``gen``; the answers are those a single longer generation gives.

Completion backends only (``Runtime``, ``RuntimeEndpoint``, a non-chat ``OpenAI``), as in
SGLang, whose chat-model variant batches a whole assistant turn instead; here a chat model is
refused. Constrained gens (``regex``, ``json_schema``, ``dtype``) are refused too: one free
generation cannot honour each gen's own constraint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from plait.frontend.ir import GenParams


class ApiSpeculation:
    """The speculated text of one program state not yet used by a ``gen`` or appended text."""

    def __init__(self, num_tokens: int):
        self.num_tokens = num_tokens
        self.text = ""

    def follow(self, appended: str) -> None:
        """The program appended ``appended``: keep the speculation only if it predicted it."""
        if self.text.startswith(appended):
            self.text = self.text[len(appended) :]
        else:
            self.text = ""

    def generate(self, s: Any, backend: Any, params: GenParams) -> tuple[str, dict[str, Any]]:
        """One gen's text, from the speculation (asked anew when it is used up)."""
        _check_speculable(backend, params)
        meta: dict[str, Any] = {}
        if not self.text:
            wide = dataclasses.replace(
                params, stop=[], max_new_tokens=max(params.max_new_tokens or 0, self.num_tokens)
            )
            self.text, meta = backend.generate(s, wide)
        stops = [i for i in (self.text.find(x) for x in params.stop or [] if x) if i >= 0]
        end = min(stops) if stops else min(params.max_new_tokens or 0, len(self.text))
        piece, self.text = self.text[:end], self.text[end:]
        return piece, meta


def _check_speculable(backend: Any, params: GenParams) -> None:
    if getattr(backend, "is_chat_model", False):
        raise ValueError(
            "num_api_spec_tokens: a chat model's API cannot continue a partial "
            "message, so Plait does not speculate on it; drop the option"
        )
    if params.regex is not None or params.json_schema is not None:
        raise ValueError(
            "num_api_spec_tokens: a gen with regex, json_schema or dtype cannot "
            "be served from a speculated free-text generation"
        )
