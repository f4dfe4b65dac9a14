"""The decode side: one KV slot per running request, and the retraction ladder that makes
room when there is none.

When ``kv.alloc_decode`` fails (the KVManager has already evicted what it could), the ladder
climbs one rung at a time and retries:

1. settle the batches in flight (``drain``): finishes free KV, and retraction needs requests
   whose outputs are processed;
2. release waiting requests that hold KV for jump-forward tokens not extended yet;
3. send the half-prefilled prompt back to the queue;
4. a lone running request that still does not fit is aborted ("KV cache too small");
5. otherwise retract the running request that has produced least, and raise
   ``new_token_ratio`` so admission reserves more from now on.

Retracted requests keep their output tokens (and grammar) and go to the head of the queue;
their computed KV stays in the prefix cache, so resuming is cheap. Nothing is ever dropped.

``new_token_ratio`` is the share of each request's remaining ``max_new_tokens`` that
admission keeps free (see ``prefill.py``): it decays a little with every decode step and
jumps after a retraction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from plait.core.decode_traits import traits_of
from plait.core.finish_reason import FinishReason
from plait.core.intake import long_rope_namespace
from plait.core.kv_manager import KVManager
from plait.core.req_table import ReqTable
from plait.core.request import Req
from plait.core.scheduler_config import SchedulerConfig, SchedulerStats

log = logging.getLogger(__name__)


class DecodeAllocator:
    def __init__(
        self,
        kv: KVManager,
        table: ReqTable,
        stats: SchedulerStats,
        config: SchedulerConfig,
        drain: Callable[[], None],
        end: Callable[[Req, FinishReason], None],
        eos_ids: set[int],
    ):
        """``drain`` processes every batch in flight; ``end`` removes a request from the
        table, releases its KV and reports ``reason``."""
        self.kv = kv
        self.table = table
        self.stats = stats
        self.config = config
        self.drain = drain
        self.end = end
        self.eos_ids = eos_ids
        self.new_token_ratio = config.init_new_token_ratio

    def decayed(self) -> None:
        """One decode step planned: trust the reservation a little less."""
        cfg = self.config
        self.new_token_ratio = max(
            cfg.min_new_token_ratio, self.new_token_ratio - cfg.new_token_ratio_decay
        )

    def certainly_done(self, req: Req) -> bool:
        """The token in flight will finish ``req`` by length: decoding past it is waste (and
        past the context length, out of range)."""
        limit = traits_of(req, self.config.context_len, self.eos_ids).limit
        return len(req.output_ids) + (req.future is not None) >= limit

    def to_decode(self) -> list[Req]:
        """The running requests that still need a token (one pass, no call per request)."""
        ctx, eos = self.config.context_len, self.eos_ids
        return [
            r
            for r in self.table.running
            if len(r.output_ids) + (r.future is not None)
            < (r.traits or traits_of(r, ctx, eos)).limit
        ]

    def alloc(self) -> tuple[list[Req], torch.Tensor] | None:
        """The requests to decode and one slot each, climbing the ladder until it fits."""
        while True:
            if self._reprefill_at_rope_switch():
                continue
            reqs = self.to_decode()
            if not reqs:
                return None
            slots = self.kv.alloc_decode(reqs)
            if slots is not None:
                return reqs, slots
            if self.table.inflight:
                self.drain()
                continue
            if self.release_pending_jumps() or self._retract_chunked():
                continue
            if len(self.table.running) == 1:
                self.end(
                    self.table.running[0], FinishReason.abort("KV cache too small for this request")
                )
                return None
            self._retract_one()

    def _reprefill_at_rope_switch(self) -> bool:
        """Base-model requests whose next decode would reach past the model's RoPE switch
        (``rope_reprefill_length``) go back to the queue, to be prefilled again whole with the
        long frequencies (transformers' Phi-3 ``generate`` drops its cache there) under the
        long-RoPE prefix-cache namespace; their short-RoPE keys stay cached in the base one."""
        n = self.config.rope_reprefill_length
        if n is None:
            return False
        due = [
            r
            for r in self.table.running
            if r.cache_namespace is None
            and len(r.input_ids) + len(r.output_ids) + (r.future is not None) > n
        ]
        if not due:
            return False
        if self.table.inflight:  # retraction needs the outputs processed
            self.drain()
            return True
        for req in due:
            self.kv.release(req)
            req.cache_namespace = long_rope_namespace(n)
            self.table.requeue(req)
        return True

    def release_pending_jumps(self) -> bool:
        """Retract waiting requests that hold KV for jump-forward tokens not yet extended.

        They are not running, so decode never retracts them: without this, two of them each
        waiting for the other's KV hang the engine, and a lone running request could be aborted
        as too large for a pool they occupy. Output tokens (and the grammar) are kept."""
        held = [r for r in self.table.waiting if r.req_pool_idx is not None]
        for req in held:
            self.kv.release(req)
            req.times_retracted += 1
            self.stats.retractions += 1
        return bool(held)

    def _retract_chunked(self) -> bool:
        """Send a half-prefilled prompt back to the queue (its chunks stay in the prefix
        cache): running requests come first, and a lone one must not be aborted as too large
        for a pool the chunked prompt occupies."""
        req = self.table.chunked
        if req is None:
            return False
        self._retract(req)
        return True

    def _retract_one(self) -> None:
        # Retract the request that has produced least: it loses the least work.
        victim = min(self.table.running, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
        self._retract(victim)
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.3)
        log.info(
            "retracted %s (%d output tokens) under KV pressure", victim.rid, len(victim.output_ids)
        )

    def _retract(self, req: Req) -> None:
        self.kv.release(req)
        req.times_retracted += 1
        self.table.requeue(req)
        self.stats.retractions += 1


def decode_rows(reqs: list[Req]) -> tuple[list[int], list[int], bool]:
    """Per request of a decode batch, in one pass: its input (the last token, or the
    placeholder of the token in flight), the output count its new token must still match
    (one more when a token is in flight), and whether any input is a placeholder."""
    inputs, expect, pending = [], [], False
    for r in reqs:
        n = len(r.output_ids)
        if r.future is None:
            inputs.append(r.output_ids[-1])
            expect.append(n)
        else:
            inputs.append(r.future)
            expect.append(n + 1)
            pending = True
    return inputs, expect, pending


def claim_rows(reqs: list[Req], futures: Sequence[int]) -> None:
    """Commit one decode token per request: placeholder ``futures[i]``, ``kv_len`` advanced."""
    for req, f in zip(reqs, futures):
        req.future = f
        req.kv_len += 1
