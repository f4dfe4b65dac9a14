"""What a frontend backend implements, and which backend runs a program that names none.

The interpreter talks to a backend only through :class:`FrontendBackend`. Built in:
``Runtime`` (in-process engine) and ``RuntimeEndpoint`` (``/generate`` over HTTP), both through
``NativeBackend``, and ``OpenAI`` (any OpenAI-compatible server). A new backend subclasses
this and implements the abstract methods; the others have documented defaults.

``s`` below is the program state's executor: ``s.text_`` is the text so far, ``s.messages_``
the finished chat messages, ``s.cur_role`` / ``s.cur_role_begin_pos`` the open role.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

from plait.frontend.chat_template import ChatTemplate
from plait.frontend.choices import ChoicesDecision, ChoicesSamplingMethod
from plait.frontend.global_config import global_config
from plait.frontend.ir import GenParams


@dataclass
class TokenUsage:
    """SGLang's ``backend.token_usage``: the prompt tokens a backend's requests sent and the
    completion tokens they received, as the server counted them. One object per backend for
    its whole life, so a reference taken before ``reset()`` keeps counting."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, 0)


class FrontendBackend(abc.ABC):
    chat_template: ChatTemplate  # renders role markers into the program's text
    token_usage: TokenUsage  # what the backend's requests cost, in tokens

    @property
    def endpoint(self) -> "FrontendBackend":
        """SGLang programs pass ``runtime.endpoint`` around; it is the backend itself."""
        return self

    @abc.abstractmethod
    def generate(self, s: Any, params: GenParams) -> tuple[str, dict[str, Any]]:
        """Generate after ``s.text_``; returns the text and its meta info."""

    @abc.abstractmethod
    def generate_stream(self, s: Any, params: GenParams) -> Iterator[tuple[str, dict[str, Any]]]:
        """:meth:`generate`, streamed: yields (new text, meta info so far)."""

    @abc.abstractmethod
    def select(
        self, s: Any, choices: list[str], temperature: float, method: ChoicesSamplingMethod
    ) -> ChoicesDecision:
        """Pick one of ``choices`` to follow ``s.text_``, scored by ``method``."""

    #: whether :meth:`concatenate_and_append` joins KV caches (``join("concate_and_append")``)
    support_concate_and_append: bool = False

    def concatenate_and_append(self, s: Any, branches: list[Any]) -> list[int]:
        """Join the KV of ``branches`` (fork branches of ``s``, finished) after ``s``'s
        text; returns the joined token ids. Only where ``support_concate_and_append``."""
        raise NotImplementedError(f"{type(self).__name__} cannot join KV caches")

    def cache_prefix(self, text: str) -> Any:
        """Prefill ``text`` so later requests sharing it hit a prefix cache. Default: nothing,
        for servers that cache prefixes on their own (or not at all): it only saves time."""
        return None

    def flush_cache(self) -> Any:
        """Empty the backend's prefix cache. Default: refused, naming the backend."""
        raise NotImplementedError(f"{type(self).__name__} cannot flush a prefix cache")

    def get_server_info(self) -> dict[str, Any]:
        """Limits and counters of the engine behind the backend. Default: refused."""
        raise NotImplementedError(f"{type(self).__name__} reports no server info")

    def get_model_name(self) -> str:
        """The model the backend serves (SGLang: the server's model path). Default: refused."""
        raise NotImplementedError(f"{type(self).__name__} reports no model name")

    def shutdown(self) -> None:
        """Release what the backend owns (an in-process engine). Default: nothing to do."""


def set_default_backend(backend: Any) -> None:
    """Backend for programs run without ``backend=``: a Runtime, RuntimeEndpoint or OpenAI.
    Stored where SGLang keeps it, ``global_config.default_backend``."""
    global_config.default_backend = backend


def get_default_backend() -> Any:
    return global_config.default_backend


def resolve_backend(backend: Any) -> Any:
    """The backend a call names, else the default; ``ValueError`` when there is neither."""
    backend = backend if backend is not None else global_config.default_backend
    if backend is None:
        raise ValueError("backend: none given; pass backend= or call pl.set_default_backend()")
    return getattr(backend, "endpoint", backend)
