"""Fixtures for the frontend tests: a scripted fake backend (fast tests of the interpreter)
and the real SmolLM2 model in-process and behind ``plait serve`` (``slow`` tests)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import pytest

import plait.frontend as pl
from plait.frontend.backends.base import FrontendBackend
from plait.frontend.chat_template import chatml


class FakeBackend(FrontendBackend):
    """Answers every gen with ``reply(prompt, params)``; records what it was asked.

    ``barrier``: when set, each gen waits until that many gens are in flight at once, which
    proves fork branches reach the backend concurrently (a sequential interpreter times out).
    """

    def __init__(self, reply: Callable[[str, Any], str] | None = None, barrier: int | None = None):
        self.chat_template = chatml()
        self.reply = reply or (lambda prompt, params: f"<{len(self.prompts)}>")
        self.prompts: list[str] = []
        self.params: list[Any] = []
        self.cached: list[str] = []
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(barrier, timeout=10) if barrier else None

    def generate(self, s: Any, params: Any) -> tuple[str, dict]:
        if self._barrier is not None:
            self._barrier.wait()
        with self._lock:
            text = self.reply(s.text_, params)
            self.prompts.append(s.text_)
            self.params.append(params)
        return text, {"prompt_tokens": len(s.text_), "completion_tokens": len(text)}

    def generate_stream(self, s: Any, params: Any):
        text, meta = self.generate(s, params)
        for i in range(0, len(text), 2):
            time.sleep(0.001)
            yield text[i : i + 2], meta

    def select(self, s: Any, choices: list[str], temperature: float, method: Any):
        scores = [float(len(c)) for c in choices]  # the longest choice wins
        return method(
            choices=choices,
            normalized_prompt_logprobs=scores,
            input_token_logprobs=[[[x, 0, None]] for x in scores],
        )

    def cache_prefix(self, text: str) -> None:
        self.cached.append(text)


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def make_fake() -> type[FakeBackend]:
    return FakeBackend


@pytest.fixture(scope="session")
def runtime(smollm_dir):
    """The real model in-process, shared by every slow test (loading takes seconds)."""
    rt = pl.Runtime(model_path=str(smollm_dir), random_seed=0)
    yield rt
    rt.shutdown()


@pytest.fixture(scope="session")
def server_url(real_server) -> str:
    """``plait serve`` for the HTTP backends: the run's shared real server (tests/conftest.py)."""
    return real_server.url


@pytest.fixture(scope="session")
def endpoint(server_url):
    return pl.RuntimeEndpoint(server_url)
