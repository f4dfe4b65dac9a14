"""Continuous batching: a waiting queue, a running batch, one forward per ``step()``.

Each step either prefills newly admitted requests (possibly one chunk of a long prompt) or
decodes one token for every running request, or (``enable_mixed_chunk``, ``mixed.py``) does
both in one forward. Admission is by token budget and free KV; when
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

Who does what: ``req_table.py`` says where each request is; ``prefill.py`` plans an extend
batch (admission, chunking, the decode reservation); ``decode.py`` finds decode slots and
retracts under pressure; ``output_processor.py`` applies results. This module builds batches
from their plans, runs the step, and ends requests (``abort``, errors): a request ends by
leaving the table, releasing its KV and reporting a :class:`FinishReason`, in one place.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from plait.core import mixed
from plait.core.batch_executor import BatchExecutor, PlannedBatch
from plait.core.decode import DecodeAllocator, claim_rows, decode_rows
from plait.core.decode_traits import BatchTraitsCache, traits_of
from plait.core.finish_reason import FinishReason
from plait.core.kv_manager import KVManager
from plait.core.model_runner import ExtendItem, ModelRunner
from plait.core.output_processor import HandOff, OutputProcessor
from plait.core.prefill import PrefillAdder
from plait.core.req_table import ReqTable
from plait.core.request import Req
from plait.core.request_output import RequestFinisher
from plait.core.scheduler_config import SchedulerConfig, SchedulerStats
from plait.core.spec.verify import Speculator

__all__ = ["HandOff", "Scheduler", "SchedulerConfig", "SchedulerStats"]

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        runner: ModelRunner,
        kv: KVManager,
        finisher: RequestFinisher,
        config: SchedulerConfig,
    ):
        self.runner = runner
        self.executor = BatchExecutor(
            runner, finisher.eos_ids, config.max_running_requests, overlap=config.overlap
        )
        self.kv = kv
        self.finisher = finisher
        self.config = config
        self.stats = SchedulerStats()
        self.table = ReqTable()
        self.decode = DecodeAllocator(
            kv, self.table, self.stats, config, self._drain, self._end, finisher.eos_ids
        )
        self.batch_traits = BatchTraitsCache(config.context_len, finisher.eos_ids)
        self.output = OutputProcessor(kv, finisher, self.table, self.stats, config, self._end)
        #: verify passes as decode-shaped batches (``ModelRunner.prepare_verify``), else as
        #: extend batches: the runner's choice (decode-shaped with the CPU's native step)
        self.verify_as_decode = bool(getattr(runner, "decode_shaped_verify", False))
        self.spec: Speculator | None = None
        if config.speculative is not None:
            self.spec = Speculator(
                config.speculative,
                kv,
                self.table,
                self.stats,
                config,
                finisher,
                self.output.after_append,
                self._end,
            )
            self.output.observe_pass = self.spec.observe

    # ----- views kept for callers (engine info, tests) -----

    @property
    def waiting(self) -> list[Req]:
        return self.table.waiting

    @property
    def running(self) -> list[Req]:
        return self.table.running

    @property
    def chunked(self) -> Req | None:
        return self.table.chunked

    @property
    def new_token_ratio(self) -> float:
        return self.decode.new_token_ratio

    @new_token_ratio.setter
    def new_token_ratio(self, value: float) -> None:
        self.decode.new_token_ratio = value

    def connect_hand_off(self, side: HandOff) -> None:
        """On a prefill server: hand each request to ``side`` once its first token is
        sampled (see :class:`HandOff`). Connected after construction because the side is
        built from this scheduler's ``finish_handed_off`` and ``abort_room``."""
        self.output.hand_off = side

    # ----- queue management -----

    def add_request(self, req: Req) -> None:
        self.table.waiting.append(req)

    def add_prefilled(self, req: Req, token: int) -> None:
        """Admit a request whose prompt KV another server computed (``kv_len`` covers the
        prompt) with the first token it sampled: straight into the running batch. What a
        unified server does after a first token follows here (a grammar advanced past it,
        then its forced continuation appended), so both give the same output."""
        self.stats.prompt_tokens += len(req.input_ids)
        self.stats.generated_tokens += 1
        self.finisher.append_token(req, token, self.config.context_len)
        self.table.running.append(req)
        self.output.after_append(req)

    def finish_unscheduled(self, req: Req, reason: FinishReason) -> None:
        """Report the end of a request the scheduler never held (it waited elsewhere, e.g.
        for its KV from a prefill server); its KV, if any, is the caller's to free."""
        self.finisher.finish_now(req, reason)

    def finish_handed_off(self, req: Req, reason: FinishReason) -> None:
        """End a request given to the hand-off: release its KV and report ``reason``."""
        self.kv.release(req)
        req.reason = None  # the hand-off's outcome decides, not the first token's
        self.finisher.finish_now(req, reason)

    def has_work(self) -> bool:
        return self.table.has_work()

    def abort(self, rid: str) -> bool:
        """End request ``rid`` wherever it is (queued, running, chunked or only in flight)."""
        req = self.table.find(rid)
        if req is not None:
            self._end(req, FinishReason.abort("aborted"))
        return req is not None

    def abort_room(self, room: int) -> bool:
        """Abort the request of disaggregation bootstrap room ``room`` (prefill mode: its
        decode half is gone), wherever it is before its hand-off."""
        req = self.table.find_where(lambda r: r.bootstrap is not None and r.bootstrap.room == room)
        return req is not None and self.abort(req.rid)

    def bootstrap_rooms(self) -> frozenset[int]:
        """The bootstrap rooms of the unfinished requests held here (prefill mode: the ones
        whose decode halves the heartbeat keeps waiting)."""
        return frozenset(r.bootstrap.room for r in self.table if r.bootstrap and not r.finished)

    def flush_cache(self) -> bool:
        """Drop the prefix cache; refused while requests hold cached prefixes. A batch still in
        flight with no request left to serve (the overlap schedule's decode row launched
        before its request finished) is processed first: it holds no prefix, only a race."""
        if self.table.holds_requests():
            return False
        self._drain()
        if self.has_work():
            return False
        self.kv.flush()
        return True

    def concat_and_append(self, prefix: list[int], branches: list[list[int]]) -> list[int]:
        """Cache the branches' segments after ``prefix`` as one sequence, reusing their KV
        (``KVManager.concat_and_append``); returns its token ids. Batches in flight are
        processed first, so every slot it copies is final."""
        if hasattr(self.runner, "ranks"):
            raise ValueError("concate_and_append over KV is not supported with --tp or --pp yet")
        self._drain()
        pool = self.runner.kv_pool
        buffers = [b for pair in zip(pool.k_buffers, pool.v_buffers) for b in pair]
        return self.kv.concat_and_append(prefix, branches, buffers)

    def _end(self, req: Req, reason: FinishReason) -> None:
        """Finish ``req`` now: out of the table, its KV released, ``reason`` reported. An
        ``error`` reason is an engine failure (the server answers 5xx, never a normal
        finish)."""
        self.table.remove(req)
        try:
            self.kv.release(req)
        except Exception:  # noqa: BLE001 - the request must still end; keep serving others
            log.exception("could not release %s", req.rid)
        self.finisher.finish_now(req, reason)

    # ----- one step -----

    @torch.inference_mode()
    def step(self) -> None:
        """Plan and launch one batch, then process every launched batch but (overlap on) the
        newest, whose forward runs meanwhile."""
        t0 = time.perf_counter()
        nested = self.stats.process_seconds + self.stats.wait_seconds
        plan = self._plan()
        self.stats.schedule_seconds += (time.perf_counter() - t0) - (
            self.stats.process_seconds + self.stats.wait_seconds - nested
        )  # minus drains
        inflight = self.table.inflight
        if plan is not None:
            inflight.append((plan, self.executor.launch(plan)))
        keep = 1 if plan is not None and self.executor.overlap else 0
        while len(inflight) > keep:
            self.output.process(*inflight.popleft())

    def _plan(self) -> PlannedBatch | None:
        if self.config.enable_mixed_chunk and (self.table.waiting or self.table.chunked):
            decode = self.decode.alloc() if self.decode.to_decode() else None
            if decode is not None:  # decodes first; a prefill rides along (mixed.py)
                items = self._schedule_prefill(len(decode[0]))
                if not items:
                    return self._guarded(self._plan_decode, decode, decode[0])
                reqs = [it.req for it in items] + decode[0]
                return self._guarded(lambda a: self._plan_extend(*a), (items, decode), reqs)
        items = self._schedule_prefill()
        if items:
            return self._guarded(self._plan_extend, items, [it.req for it in items])
        if self.spec is not None:
            reqs = self.decode.to_decode()
            verify = self.spec.plan(reqs) if reqs else None
            if verify is not None:
                return self._guarded(self._plan_verify, verify, reqs)
        decode = self.decode.alloc()
        if decode is not None:
            return self._guarded(self._plan_decode, decode, decode[0])
        if not self.table.inflight:  # nothing fits and nothing runs: KV held for jump-forward
            self.decode.release_pending_jumps()
        return None

    def _schedule_prefill(self, decode_rows: int = 0) -> list[ExtendItem]:
        """This step's extend items (admission: see ``prefill.py``); their KV is allocated.
        ``decode_rows``: decodes riding in the same forward, taken off the token budget."""
        return PrefillAdder(
            self.kv, self.table, self.stats, self.config, self.decode.new_token_ratio, decode_rows
        ).schedule()

    def _guarded(self, fn: Any, arg: Any, reqs: list[Req]) -> PlannedBatch | None:
        """A batch that cannot be built finishes its own requests with an error."""
        try:
            return fn(arg)
        except Exception as exc:  # noqa: BLE001 - isolate the failure to this batch
            log.exception("building a batch failed; aborting %d request(s)", len(reqs))
            for req in reqs:
                self._end(req, FinishReason.error(f"internal error: {exc}"))
            return None

    def _drain(self) -> None:
        """Wait for and process every batch in flight (retraction needs settled requests)."""
        while self.table.inflight:
            self.output.process(*self.table.inflight.popleft())

    def close(self) -> None:
        """Stop the executor's worker; batches still in flight are dropped unprocessed."""
        for plan, _ in self.table.inflight:
            plan.processed.set()  # a worker waiting to sample must not hang
        self.table.inflight.clear()
        self.executor.close()

    # ----- building batches -----

    def _plan_extend(
        self, items: list[ExtendItem], decode: tuple[list[Req], torch.Tensor] | None = None
    ) -> PlannedBatch:
        """Build the extend batch and do now what does not depend on its logits: KV lengths,
        caching the new prefix (later batches that match it run after this one), chunking,
        and entering the running batch (so the next decode can include the request with a
        placeholder for the token this batch samples). ``decode``: running requests whose
        next token this forward computes too, after the prefill rows (``mixed.py``)."""
        rows = mixed.decode_items(*decode) if decode is not None else []
        batch, counts = self.runner.prepare_extend(items + rows)
        counts = counts[: len(items)]
        sample_reqs, sample_rows, row = [], [], 0
        for it, count in zip(items, counts):
            req = it.req
            row += count
            req.kv_len = it.start + it.length
            self.stats.prefill_tokens += it.length
            self.kv.cache_unfinished(req)
            if req.kv_len < len(req.fill_ids):
                self.table.chunked = req
            elif req.sampling.max_new_tokens > 0:
                sample_reqs.append(req)
                sample_rows.append(row - 1)
                if req not in self.table.running:
                    self.table.running.append(req)
        plan = self._planned(
            batch, items, counts, [it.req for it in items], sample_reqs, sample_rows
        )
        if decode is not None:
            self.decode.decayed()
            ctx, eos = self.config.context_len, self.finisher.eos_ids
            mixed.add_decode_rows(plan, decode[0], self.executor.futures, self.stats, ctx, eos)
        return plan

    def _plan_verify(self, verify: tuple[list[ExtendItem], list[list[int]]]) -> PlannedBatch:
        """A speculative verify pass (``plait.core.spec.verify``): an extend over each
        request's last token and draft, processed by the speculator."""
        items, drafts = verify
        shaped = getattr(self.runner, "prepare_verify", None) if self.verify_as_decode else None
        batch, counts = (shaped or self.runner.prepare_extend)(items)
        for it in items:
            it.req.kv_len = it.start + it.length
        self.decode.decayed()
        self.stats.forward_passes += 1
        self.stats.spec_verify_passes += 1
        spec = self.spec
        assert spec is not None
        reqs = [it.req for it in items]
        return PlannedBatch(
            batch,
            items,
            counts,
            reqs,
            [],
            [],
            [],
            [],
            needs_state=False,
            has_placeholders=False,
            verify=lambda logits: spec.apply(items, drafts, logits),
        )

    def _plan_decode(self, decode: tuple[list[Req], torch.Tensor]) -> PlannedBatch:
        """One row per request (``decode_rows``, ``claim_rows``); the set's traits from a
        one-entry cache: the same requests decode step after step."""
        reqs, slots = decode
        inputs, expect, pending = decode_rows(reqs)
        batch = self.runner.prepare_decode(reqs, slots, inputs)
        if self.spec is not None:
            for req in reqs:
                self.spec.state(req).record(0, 0, 0)  # a step without a draft
        self.decode.decayed()
        futures = self.executor.futures.reserve(len(reqs))
        claim_rows(reqs, futures)
        traits = self.batch_traits.of(reqs)
        self.stats.forward_passes += 1
        return PlannedBatch(
            batch,
            None,
            [],
            reqs,
            reqs,
            list(range(len(reqs))),
            expect,
            futures,
            needs_state=traits.needs_state,
            has_placeholders=pending,
            plain_argmax=traits.plain_argmax,
            simple=traits.simple,
        )

    def _planned(
        self,
        batch: Any,
        items: list[ExtendItem],
        counts: list[int],
        reqs: list[Req],
        sample_reqs: list[Req],
        sample_rows: list[int],
    ) -> PlannedBatch:
        """An extend batch: give each sampling row its placeholder and the output count it
        must still match. Its items feed no placeholders (a request extends only tokens it
        knows; mixed decode rows are added after): any ``future`` a request still carries
        belongs to a row processing discards."""
        expect = [len(r.output_ids) for r in sample_reqs]
        ctx, eos = self.config.context_len, self.finisher.eos_ids
        futures = self.executor.futures.reserve(len(sample_reqs))
        for req, f in zip(sample_reqs, futures):
            req.future = f
        self.stats.forward_passes += 1
        return PlannedBatch(
            batch,
            items,
            counts,
            reqs,
            sample_reqs,
            sample_rows,
            expect,
            futures,
            needs_state=any(traits_of(r, ctx, eos).needs_state for r in sample_reqs),
            has_placeholders=False,
        )
