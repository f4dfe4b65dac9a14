"""Role markers (``<|im_start|>user\\n`` ... ``<|im_end|>\\n``) taken from the model's own
Jinja chat template.

A frontend program streams text: ``user_begin`` must emit the role's prefix *before* the
content exists, so we cannot just render a finished conversation. Instead we render the
template twice with placeholder contents -- the history so far, and the history plus one
message whose content is a sentinel -- and cut the difference at the sentinel. The result
depends only on the sequence of roles, so it is cached per role sequence. Whatever the
template adds on its own (SmolLM2's default system prompt, a BOS token) lands in the first
prefix, exactly where ``apply_chat_template`` would put it.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

_SENTINEL = "\u2063PLAIT\u2063"  # invisible separator: no template trims or escapes it


class ChatTemplate:
    """``prefix_and_suffix(role, history)`` -> the text around one message's content."""

    def __init__(self, render: Any, name: str = "custom", strip_bos: str | None = None):
        self._render = render  # list[dict] -> str, add_generation_prompt=False
        self.name = name
        self._strip_bos = strip_bos

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ChatTemplate":
        if not getattr(tokenizer, "chat_template", None):
            return chatml()

        def render(messages: list[dict]) -> str:
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=False
            )

        # A template that writes the BOS itself would get a second one from an engine whose
        # tokenizer also adds it; keep only the tokenizer's.
        bos = getattr(tokenizer, "bos_token", None)
        bos_id = getattr(tokenizer, "bos_token_id", None)
        adds_bos = bos_id is not None and tokenizer("x").input_ids[:1] == [bos_id]
        return cls(
            render,
            name=getattr(tokenizer, "name_or_path", "tokenizer"),
            strip_bos=bos if adds_bos else None,
        )

    def render(self, messages: list[dict]) -> str:
        text = self._render(messages)
        if self._strip_bos and text.startswith(self._strip_bos):
            text = text[len(self._strip_bos) :]
        return text

    def prefix_and_suffix(self, role: str, history: list[dict]) -> tuple[str, str]:
        return self._cut(role, tuple(m["role"] for m in history))

    @functools.lru_cache(maxsize=256)  # noqa: B019 - templates live as long as their backend
    def _cut(self, role: str, roles: tuple[str, ...]) -> tuple[str, str]:
        placeholders = [{"role": r, "content": f"m{i}"} for i, r in enumerate(roles)]
        before = self.render(placeholders) if roles else ""
        full = self.render(placeholders + [{"role": role, "content": _SENTINEL}])
        at = full.find(_SENTINEL)
        if at < 0:
            raise ValueError(
                f"chat template {self.name!r} dropped the content of a "
                f"{role!r} message; cannot derive role markers"
            )
        head, tail = full[:at], full[at + len(_SENTINEL) :]
        if not head.startswith(before):
            # The template rewrites earlier turns when a new one arrives (some fold the system
            # prompt into the first user turn); we can only append, so keep the new part.
            warnings.warn(
                f"chat template {self.name!r} is not append-only for roles "
                f"{roles + (role,)}; role markers are approximate",
                stacklevel=2,
            )
            common = 0
            while common < min(len(head), len(before)) and head[common] == before[common]:
                common += 1
            before = before[:common]
        return head[len(before) :], tail


def chatml() -> ChatTemplate:
    """Fallback for backends without a tokenizer (e.g. a remote OpenAI-compatible server)."""

    def render(messages: list[dict]) -> str:
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)

    return ChatTemplate(render, name="chatml")


def load_tokenizer(path: str) -> Any | None:
    """The HF tokenizer at a local path, or ``None`` (never downloads)."""
    import os

    if not path or not os.path.isdir(os.path.expanduser(path)):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.expanduser(path), local_files_only=True)
