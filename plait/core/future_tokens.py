"""Placeholders for tokens that a forward in flight has not sampled yet.

With the overlap schedule the scheduler builds batch N+1 while batch N still runs, so a
request decoded in both has no input token for N+1 yet. The scheduler writes a negative
placeholder id instead (``reserve``); the executor fills the placeholder when batch N samples
(``store``) and swaps placeholders for tokens right before batch N+1's forward (``resolve``).
Batches run one at a time, in launch order, so a placeholder is always stored before any
batch that reads it runs.

Ids ``-1 .. -capacity`` name the slots of a ring, handed out in consecutive runs (a run that
would pass the end starts again at the beginning). A slot is reused at least ``capacity -
max_batch_size`` reservations later; the scheduler keeps at most three batches' worth
referenced (the batch whose inputs name N's placeholders, N's own, and the one being built),
so ``capacity`` leaves room for more than three batches of the largest size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class FutureTokenMap:
    def __init__(self, max_batch_size: int, device: torch.device | str = "cpu"):
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.capacity = 4 * max_batch_size + 4
        self._tokens = torch.zeros(self.capacity + 1, dtype=torch.int64, device=device)
        self._next = 0
        #: a numpy view of ``_tokens`` where it lives on the host
        self._host = self._tokens.numpy() if self._tokens.device.type == "cpu" else None

    def reserve(self, n: int) -> range:
        """``n`` fresh placeholder ids (negative, descending by one), for the tokens of one
        batch: consecutive slots, so :meth:`store` fills a slice. A batch that would run past
        the ring's end starts again at its beginning (the tail stays unused this round): a
        slot is still reused only after more than three full batches."""
        if n > self.max_batch_size:
            raise ValueError(
                f"cannot reserve {n} placeholders at once (at most {self.max_batch_size})"
            )
        first = self._next if self._next + n <= self.capacity else 0
        self._next = first + n
        return range(-(1 + first), -(1 + first + n), -1)

    def store(self, placeholders: Sequence[int], tokens: list[int]) -> None:
        """Fill ``placeholders`` with the sampled ``tokens`` (same length). A ``range`` from
        :meth:`reserve` names consecutive slots: one slice assignment, written through a
        numpy view where the map lives on the host (no tensor built from the list)."""
        if not placeholders:
            return
        if isinstance(placeholders, range) and placeholders.step == -1:
            lo = -placeholders[0]
            if self._host is not None:
                self._host[lo : lo + len(placeholders)] = tokens
            else:
                self._tokens[lo : lo + len(placeholders)] = torch.tensor(
                    tokens, dtype=torch.int64
                ).to(self._tokens.device)
            return
        idx = torch.tensor([-p for p in placeholders], dtype=torch.int64)
        self._tokens[idx.to(self._tokens.device)] = torch.tensor(tokens, dtype=torch.int64).to(
            self._tokens.device
        )

    def resolve(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` with every placeholder replaced by its stored token."""
        return torch.where(input_ids < 0, self._tokens[(-input_ids).clamp(min=0)], input_ids)
