"""The CUDA backend's asynchronous greedy-token copy (issue 41), run on the CPU: the same logic
with a recording event in place of ``torch.cuda.Event``. Never run on a GPU yet
(docs/status.md)."""

from __future__ import annotations

import types

import pytest
import torch

from plait.backends.cuda.token_copy import AsyncTokenCopy, PendingGreedyTokens, install
from plait.core.forward_batch import GreedyTokens


class _Event:
    log: list[str] = []

    def record(self) -> None:
        self.log.append("record")

    def synchronize(self) -> None:
        self.log.append("wait")


def test_tokens_are_the_argmax_and_waited_for_only_when_read() -> None:
    _Event.log = []
    copier = AsyncTokenCopy("cpu", capacity=4, slots=2, event_factory=_Event)
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    logits[2] = float("-inf")
    out = copier.greedy(logits)
    assert isinstance(out, GreedyTokens) and isinstance(out, PendingGreedyTokens)
    assert _Event.log == ["record"]  # the copy started; nobody waited
    assert out.tokens == [int(logits[0].argmax()), None, None]
    assert _Event.log == ["record", "wait"]
    assert out.tokens == [int(logits[0].argmax()), None, None]
    assert _Event.log == ["record", "wait"]  # read once


def test_a_buffer_reused_before_it_was_read_is_an_error_not_other_tokens() -> None:
    copier = AsyncTokenCopy("cpu", capacity=2, slots=2)
    first = copier.copy(torch.tensor([1, 2]))
    second = copier.copy(torch.tensor([3, 4]))
    assert second.get() == [3, 4]
    copier.copy(torch.tensor([5, 6]))  # reuses the first slot
    with pytest.raises(RuntimeError, match="reused"):
        first.get()
    big = copier.copy(torch.arange(5))  # more rows than planned: the ring grows
    assert big.get() == [0, 1, 2, 3, 4]


def test_install_answers_only_greedy_only_batches_with_pending_tokens() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    runner = types.SimpleNamespace(run=lambda batch: logits)
    install(runner, AsyncTokenCopy("cpu", capacity=2))  # type: ignore[arg-type]
    greedy = runner.run(types.SimpleNamespace(greedy_only=True))
    assert greedy.tokens == [1, 0]
    assert runner.run(types.SimpleNamespace(greedy_only=False)) is logits
