"""Continuous batching: a waiting queue, a running batch, one forward per ``step()``.

Each step either prefills newly admitted requests (possibly one chunk of a long prompt) or
decodes one token for every running request. Admission is by token budget and free KV; when
decode runs out of KV (after the :class:`~plait.core.kv_manager.KVManager` has evicted what
it could) the scheduler retracts running requests back to the queue (their computed KV stays in
the prefix cache, so resuming is cheap). It never crashes on memory pressure and never drops a
request. Where slots come from and go to is the KVManager's business alone.

Overlap schedule (the default; ``disable_overlap_schedule`` turns it off): ``step`` plans and
launches batch N+1, then processes batch N while N+1's forward runs on the executor's worker.
Planning never waits for the device: a decode row whose input token batch N has not sampled
yet carries a future-token placeholder (``future_tokens.py``), and a request whose token in
flight must finish it by length is left out. The scheduler waits for the device only to
process a result (outputs, finishes, grammar state) and before retracting (``_drain``);
sampling that needs the previous batch's state waits inside the executor (see
``batch_executor.py``). Overlap on or off, the same requests get the same tokens: only the
moment each result is processed moves.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import torch

from plait.core.batch_executor import BatchExecutor, PlannedBatch
from plait.core.kv_manager import KVManager, PrefixMatch
from plait.core.model_runner import ExtendItem, ModelRunner
from plait.core.output_processor import OutputProcessor
from plait.core.request import Req
from plait.core.request_output import RequestFinisher
from plait.core.schedule_policy import InBatchPrefixDedup, order_waiting

log = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    max_running_requests: int = 64
    chunked_prefill_size: int | None = None   # None: prompts are prefilled whole
    max_prefill_tokens: int = 8192            # token budget of one prefill batch
    schedule_policy: str = "lpm"
    context_len: int = 8192
    enable_jump_forward: bool = True          # grammar-forced text in one extend step
    init_new_token_ratio: float = 0.7         # share of max_new_tokens reserved per request
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.001
    overlap: bool = True                      # run forwards on a worker, one batch ahead


@dataclass
class SchedulerStats:
    prefill_tokens: int = 0      # tokens actually computed in extend steps
    cached_tokens: int = 0       # prompt tokens served from the prefix cache
    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0
    retractions: int = 0
    jump_forward_tokens: int = 0 # grammar-forced output tokens that skipped a decode step
    # Seconds spent per phase, summed over all steps (divide by forward_passes for a step):
    schedule_seconds: float = 0.0  # scheduler thread: admission, retraction, building batches
    forward_seconds: float = 0.0   # executor: the model's forward
    sample_seconds: float = 0.0    # executor: logits processing and sampling
    process_seconds: float = 0.0   # scheduler thread: appending tokens, finishing, outputs
    wait_seconds: float = 0.0      # scheduler thread blocked on a result it must process


class Scheduler(OutputProcessor):
    def __init__(self, runner: ModelRunner, kv: KVManager, finisher: RequestFinisher,
                 config: SchedulerConfig):
        self.runner = runner
        self.executor = BatchExecutor(runner, finisher.eos_ids, config.max_running_requests,
                                      overlap=config.overlap)
        self._inflight: deque[tuple[PlannedBatch, Future]] = deque()
        self.kv = kv
        self.finisher = finisher
        self.config = config
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked: Req | None = None
        self.new_token_ratio = config.init_new_token_ratio
        self.stats = SchedulerStats()
        # Disaggregated prefill: called with each request once its first token is sampled; it
        # takes the request (and its KV) over and ends it with ``finish_handed_off``.
        self.hand_off: Callable[[Req], None] | None = None

    # ----- queue management -----

    def add_request(self, req: Req) -> None:
        self.waiting.append(req)

    def add_prefilled(self, req: Req, token: int) -> None:
        """Admit a request whose prompt KV another server computed (``kv_len`` covers the
        prompt) with the first token it sampled: straight into the running batch."""
        self.stats.prompt_tokens += len(req.input_ids)
        self.stats.generated_tokens += 1
        self.finisher.append_token(req, token, self.config.context_len)
        if req.finished:
            self.kv.release(req)
        else:
            self.running.append(req)
        self.finisher.emit(req)

    def finish_unscheduled(self, req: Req, reason: dict) -> None:
        """Report the end of a request the scheduler never held (it waited elsewhere, e.g.
        for its KV from a prefill server); its KV, if any, is the caller's to free."""
        self._finish_now(req, reason)

    def finish_handed_off(self, req: Req, reason: dict) -> None:
        """End a request given to ``hand_off``: release its KV and report ``reason``."""
        self.kv.release(req)
        req.finish_reason = None  # the hand-off's outcome decides, not the first token's
        self._finish_now(req, reason)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self._inflight)

    def abort(self, rid: str) -> bool:
        for req in list(self.waiting):
            if req.rid == rid:
                self.waiting.remove(req)
                self._finish_now(req, {"type": "abort", "message": "aborted"})
                return True
        for req in self.running + ([self.chunked] if self.chunked else []):
            if req.rid == rid:
                if req is self.chunked:
                    self.chunked = None
                else:
                    self.running.remove(req)
                self.kv.release(req)
                self._finish_now(req, {"type": "abort", "message": "aborted"})
                return True
        for plan, _ in self._inflight:  # e.g. a max_new_tokens=0 prompt in its last extend
            for req in plan.reqs:
                if req.rid == rid and not req.finished:
                    self.kv.release(req)
                    self._finish_now(req, {"type": "abort", "message": "aborted"})
                    return True
        return False

    def abort_room(self, room: int) -> bool:
        """Abort the request of disaggregation bootstrap room ``room`` (prefill mode: its
        decode half is gone), wherever it is before its hand-off."""
        reqs = [*self.waiting, *self.running, *([self.chunked] if self.chunked else []),
                *(r for plan, _ in self._inflight for r in plan.reqs)]
        for req in reqs:
            if req.bootstrap is not None and req.bootstrap.room == room and not req.finished:
                return self.abort(req.rid)
        return False

    def flush_cache(self) -> bool:
        """Drop the prefix cache; refused while requests hold cached prefixes. A batch still in
        flight with no request left to serve (the overlap schedule's decode row launched
        before its request finished) is processed first: it holds no prefix, only a race."""
        if self.waiting or self.running or self.chunked:
            return False
        while self._inflight:
            self._process(*self._inflight.popleft())
        if self.has_work():
            return False
        self.kv.flush()
        return True

    # ----- one step -----

    @torch.inference_mode()
    def step(self) -> None:
        """Plan and launch one batch, then process every launched batch but (overlap on) the
        newest, whose forward runs meanwhile."""
        t0 = time.perf_counter()
        nested = self.stats.process_seconds + self.stats.wait_seconds
        plan = self._plan()
        self.stats.schedule_seconds += (time.perf_counter() - t0) - (
            self.stats.process_seconds + self.stats.wait_seconds - nested)  # minus drains
        if plan is not None:
            self._inflight.append((plan, self.executor.launch(plan)))
        keep = 1 if plan is not None and self.executor.overlap else 0
        while len(self._inflight) > keep:
            self._process(*self._inflight.popleft())

    def _plan(self) -> PlannedBatch | None:
        items = self._schedule_prefill()
        if items:
            return self._guarded(self._plan_extend, items, [it.req for it in items])
        decode = self._alloc_decode()
        if decode is not None:
            return self._guarded(self._plan_decode, decode, decode[0])
        if not self._inflight:  # nothing fits and nothing runs: KV held for jump-forward
            self._release_pending_jumps()
        return None

    def _guarded(self, fn: Any, arg: Any, reqs: list[Req]) -> PlannedBatch | None:
        """A batch that cannot be built finishes its own requests with an error."""
        try:
            return fn(arg)
        except Exception as exc:  # noqa: BLE001 - isolate the failure to this batch
            log.exception("building a batch failed; aborting %d request(s)", len(reqs))
            for req in reqs:
                self._fail(req, f"internal error: {exc}")
            return None

    def _drain(self) -> None:
        """Wait for and process every batch in flight (retraction needs settled requests)."""
        while self._inflight:
            self._process(*self._inflight.popleft())

    def close(self) -> None:
        """Stop the executor's worker; batches still in flight are dropped unprocessed."""
        for plan, _ in self._inflight:
            plan.processed.set()  # a worker waiting to sample must not hang
        self._inflight.clear()
        self.executor.close()

    def _fail(self, req: Req, message: str) -> None:
        """Finish ``req`` with an engine error (``{"type": "error"}``: the server reports it as
        a 5xx, never as a normal finish) and free everything it holds."""
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        if req is self.chunked:
            self.chunked = None
        if req.req_pool_idx is not None:
            try:
                self.kv.release(req)
            except Exception:  # noqa: BLE001 - keep cleaning up the others
                log.exception("could not release %s after a failure", req.rid)
        self._finish_now(req, {"type": "error", "message": message})

    # ----- prefill -----

    def _schedule_prefill(self) -> list[ExtendItem]:
        cfg = self.config
        budget = cfg.chunked_prefill_size or cfg.max_prefill_tokens
        items: list[ExtendItem] = []
        dedup = InBatchPrefixDedup()
        if self.chunked is not None:
            req, self.chunked = self.chunked, None
            item = self._plan_chunk(req, budget)
            if item is None:
                self.chunked = req
                return []
            items.append(item)
            budget -= item.length
            dedup.add(req.fill_ids)
            if req.kv_len + item.length < len(req.fill_ids):
                return items  # still chunking: one chunked request at a time
        if not self.waiting:
            return items
        reserved = self._decode_reservation(self.running)
        for req in order_waiting(self.waiting, cfg.schedule_policy, self.kv):
            if budget <= 0 or len(self.running) + len(items) >= cfg.max_running_requests:
                break
            if req.req_pool_idx is not None:
                # holds its KV already (jump-forward tokens to extend): no admission needed
                prefix = None
                extend = len(req.fill_ids) - req.kv_len
            else:
                prefix = self.kv.match(req)
                if dedup.should_defer(req.fill_ids, prefix.length):
                    continue
                extend = len(req.fill_ids) - prefix.length
            if cfg.chunked_prefill_size is None and extend > budget and items:
                break  # an unchunked long prompt goes alone in the next step
            need = min(extend, budget) if cfg.chunked_prefill_size else extend
            reserve = reserved + self._decode_reservation([req])
            nothing_running = not self.running and not items
            if self.kv.free_tokens() < need + (0 if nothing_running else reserve):
                break
            if prefix is None:
                item = self._plan_chunk(req, need)
            else:
                item = self._admit(req, prefix, need)
            if item is None:
                break
            self.waiting.remove(req)
            items.append(item)
            dedup.add(req.fill_ids)
            budget -= need
            reserved = reserve
            if item.length < extend:
                break  # this one is chunked; it continues next step
        return items

    def _admit(self, req: Req, prefix: PrefixMatch, need: int) -> ExtendItem | None:
        if not self.kv.admit(req, prefix):
            return None
        p = prefix.length
        if not req.output_ids:  # first admission (not a resumed retraction)
            req.cached_tokens = p
            self.stats.cached_tokens += p
            self.stats.prompt_tokens += len(req.input_ids)
        item = self._plan_chunk(req, need)
        if item is None:
            self.kv.release(req)
        return item

    def _plan_chunk(self, req: Req, budget: int) -> ExtendItem | None:
        """Allocate KV for the next ``<= budget`` tokens of ``req``'s pending fill."""
        start = req.kv_len
        length = min(len(req.fill_ids) - start, budget)
        slots = self.kv.alloc_extend(req, length)
        if slots is None:
            return None
        final = start + length == len(req.fill_ids)
        if req.wants_input_logprobs:
            logit_from = max(req.logprob_start_len - 1, 0)
        else:
            logit_from = start + length - 1 if final else start + length
        return ExtendItem(req=req, start=start, length=length, slots=slots, logit_from=logit_from)

    def _plan_extend(self, items: list[ExtendItem]) -> PlannedBatch:
        """Build the extend batch and do now what does not depend on its logits: KV lengths,
        caching the new prefix (later batches that match it run after this one), chunking,
        and entering the running batch (so the next decode can include the request with a
        placeholder for the token this batch samples)."""
        batch, counts = self.runner.prepare_extend(items)
        sample_reqs, sample_rows, row = [], [], 0
        for it, count in zip(items, counts):
            req = it.req
            row += count
            req.kv_len = it.start + it.length
            self.stats.prefill_tokens += it.length
            self.kv.cache_unfinished(req)
            if req.kv_len < len(req.fill_ids):
                self.chunked = req
            elif req.sampling.max_new_tokens > 0:
                sample_reqs.append(req)
                sample_rows.append(row - 1)
                if req not in self.running:
                    self.running.append(req)
        return self._planned(batch, items, counts, [it.req for it in items], sample_reqs,
                             sample_rows, decode=False)

    def _plan_decode(self, decode: tuple[list[Req], torch.Tensor]) -> PlannedBatch:
        reqs, slots = decode
        inputs = [r.future if r.future is not None else r.output_ids[-1] for r in reqs]
        batch = self.runner.prepare_decode(reqs, slots, inputs)
        for req in reqs:
            req.kv_len += 1
        self.new_token_ratio = max(self.config.min_new_token_ratio,
                                   self.new_token_ratio - self.config.new_token_ratio_decay)
        return self._planned(batch, None, [], reqs, reqs, list(range(len(reqs))), decode=True)

    def _planned(self, batch: Any, items: list[ExtendItem] | None, counts: list[int],
                 reqs: list[Req], sample_reqs: list[Req], sample_rows: list[int],
                 decode: bool) -> PlannedBatch:
        """Give each sampling row its placeholder and the output count it must still match.
        Only a decode feeds placeholders: a request extends only tokens it knows, and any
        ``future`` it still carries then belongs to a row that processing will discard."""
        pending = [decode and r.future is not None for r in sample_reqs]
        expect = [len(r.output_ids) + p for r, p in zip(sample_reqs, pending)]
        futures = self.executor.futures.reserve(len(sample_reqs))
        for req, f in zip(sample_reqs, futures):
            req.future = f
        self.stats.forward_passes += 1
        return PlannedBatch(batch, items, counts, reqs, sample_reqs, sample_rows, expect,
                            futures, needs_state=any(_needs_state(r) for r in sample_reqs),
                            has_placeholders=any(pending))

    # ----- decode -----

    def _certainly_done(self, req: Req) -> bool:
        """The token in flight will finish ``req`` by length: decoding past it is waste (and
        past the context length, out of range)."""
        n = len(req.output_ids) + (req.future is not None)
        return n >= req.sampling.max_new_tokens or len(req.input_ids) + n >= self.config.context_len

    def _alloc_decode(self) -> tuple[list[Req], torch.Tensor] | None:
        """The requests to decode and one slot each, retracting requests until it fits."""
        while True:
            reqs = [r for r in self.running if not self._certainly_done(r)]
            if not reqs:
                return None
            slots = self.kv.alloc_decode(reqs)
            if slots is not None:
                return reqs, slots
            if self._inflight:  # finishes may free KV; retraction needs settled requests
                self._drain()
                continue
            if self._release_pending_jumps() or self._retract_chunked():
                continue
            if len(self.running) == 1:
                req = self.running.pop()
                self.kv.release(req)
                self._finish_now(req, {"type": "abort",
                                       "message": "KV cache too small for this request"})
                return None
            self._retract_one()

    def _release_pending_jumps(self) -> bool:
        """Retract waiting requests that hold KV for jump-forward tokens not yet extended.

        They are not running, so decode never retracts them: without this, two of them each
        waiting for the other's KV hang the engine, and a lone running request could be aborted
        as too large for a pool they occupy. Output tokens (and the grammar) are kept."""
        held = [r for r in self.waiting if r.req_pool_idx is not None]
        for req in held:
            self.kv.release(req)
            req.times_retracted += 1
            self.stats.retractions += 1
        return bool(held)

    def _retract_chunked(self) -> bool:
        """Send a half-prefilled prompt back to the queue (its chunks stay in the prefix
        cache): running requests come first, and a lone one must not be aborted as too large
        for a pool the chunked prompt occupies."""
        req, self.chunked = self.chunked, None
        if req is None:
            return False
        self.kv.release(req)
        req.times_retracted += 1
        self.waiting.insert(0, req)
        self.stats.retractions += 1
        return True

    def _retract_one(self) -> None:
        # Retract the request that has produced least: it loses the least work.
        victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
        self.running.remove(victim)
        self.kv.release(victim)
        victim.times_retracted += 1
        self.waiting.insert(0, victim)
        self.stats.retractions += 1
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.3)
        log.info("retracted %s (%d output tokens) under KV pressure", victim.rid,
                 len(victim.output_ids))

    def _finish_now(self, req: Req, reason: dict) -> None:
        req.finish(reason)
        self.finisher.finalize_text(req)
        self.finisher.emit(req)

    # ----- admission budget -----

    def _decode_reservation(self, reqs: list[Req]) -> int:
        return int(sum(max(r.sampling.max_new_tokens - len(r.output_ids), 0)
                       for r in reqs) * self.new_token_ratio)


def _needs_state(req: Req) -> bool:
    """Sampling for ``req`` reads state that processing the previous batch may change."""
    sp = req.sampling
    return (req.grammar is not None or bool(sp.frequency_penalty or sp.presence_penalty)
            or sp.repetition_penalty != 1.0 or sp.min_new_tokens > 0)
