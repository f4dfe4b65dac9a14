"""Processing a batch's result on the scheduler thread: prompt logprobs, appending sampled
tokens, jump-forward, finishing, and handing outputs to whoever waits.

Under the overlap schedule a result is processed one step late, while the next batch already
runs, and that batch may include requests this processing finishes (their extra token is
computed and then dropped here: it never reaches the user) or jump-forwards (their row there
is stale). A sampled token therefore counts only if its request is unfinished and still has
the output count the row was planned against (``PlannedBatch.expect``).

It owns no request state: it moves requests in the :class:`~plait.core.req_table.ReqTable`
(out of ``running`` when finished or handed off, to the head of ``waiting`` after a
jump-forward), releases the KV of those that finished, and ends a failing one through the
scheduler's ``end`` (which removes it wherever it is).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol, cast

import torch

from plait.core.batch_executor import BatchResult, PlannedBatch
from plait.core.decode_traits import traits_of
from plait.core.finish_reason import FinishReason
from plait.core.kv_manager import KVManager
from plait.core.model_runner import ExtendItem
from plait.core.req_table import ReqTable
from plait.core.request import Req
from plait.core.request_output import RequestFinisher
from plait.core.sampler import token_logprobs
from plait.core.scheduler_config import SchedulerConfig, SchedulerStats

log = logging.getLogger(__name__)


class HandOff(Protocol):
    """Disaggregated prefill: the side that takes each request over once its first token is
    sampled. It owns the request (and its KV) from then on and ends it with the scheduler's
    ``finish_handed_off``. :class:`plait.disaggregation.prefill.PrefillSide` is one."""

    def hand_off(self, req: Req) -> None: ...


class OutputProcessor:
    """Applies batch results to their requests (see the module docstring)."""

    def __init__(
        self,
        kv: KVManager,
        finisher: RequestFinisher,
        table: ReqTable,
        stats: SchedulerStats,
        config: SchedulerConfig,
        end: Callable[[Req, FinishReason], None],
    ):
        self.kv = kv
        self.finisher = finisher
        self.table = table
        self.stats = stats
        self.config = config
        self.end = end
        #: a prefill server's side (``Scheduler.connect_hand_off``); None elsewhere
        self.hand_off: HandOff | None = None
        #: told each decode-phase pass's token count and forward seconds (speculation's cost
        #: model, ``plait.core.spec.cost``); None when nobody listens
        self.observe_pass: Callable[[int, float, bool], None] | None = None

    def process(self, plan: PlannedBatch, fut: Future) -> None:
        """Wait for ``plan``'s result and apply it; the next batch may sample after this."""
        t0 = time.perf_counter()
        result: BatchResult = fut.result()
        t1 = time.perf_counter()
        self.stats.wait_seconds += t1 - t0
        self.stats.forward_seconds += result.forward_s
        self.stats.sample_seconds += result.sample_s
        if self.observe_pass is not None and result.error is None:
            if plan.verify is not None:
                self.observe_pass(sum(plan.row_counts), result.forward_s, True)
            elif plan.items is None:  # a plain decode
                self.observe_pass(len(plan.reqs), result.forward_s, False)
        try:
            self._apply(plan, result)
        finally:
            plan.processed.set()  # the next batch may sample now
            self.stats.process_seconds += time.perf_counter() - t1

    def _apply(self, plan: PlannedBatch, result: BatchResult) -> None:
        tokens = result.tokens
        if (
            plan.simple
            and not plan.needs_state  # nothing was skipped when sampled
            and result.error is None
            and self.hand_off is None
            and len(tokens) == len(plan.sample_reqs)
            and None not in tokens
        ):
            self._apply_simple(plan, cast("list[int]", tokens))
            return
        for req, placeholder in zip(plan.sample_reqs, plan.futures):
            if req.future == placeholder:
                req.future = None
        if result.error is not None:  # a failing forward finishes its own batch
            log.error("aborting %d request(s) after a failed forward", len(plan.reqs))
            for req in plan.reqs:
                if not req.finished:
                    self.end(req, FinishReason.error(f"internal error: {result.error}"))
            return
        if plan.verify is not None:
            assert result.logits is not None
            plan.verify(result.logits)
            return
        if plan.items is not None:
            self._apply_extend(plan.items, plan.row_counts, result.logits)
        self._apply_tokens(plan, result)

    def _apply_extend(
        self, items: list[ExtendItem], counts: list[int], logits: torch.Tensor | None
    ) -> None:
        """``logits`` is None only when the model sampled greedily itself, which it does
        only for batches that want no prompt logprobs."""
        row = 0
        for it, count in zip(items, counts):
            req = it.req
            first, row = row, row + count
            if req.finished:
                continue
            if req.wants_input_logprobs:
                assert logits is not None
                self._record_input_logprobs(req, it, logits[first:row])
            if it.start + it.length == len(req.fill_ids) and req.sampling.max_new_tokens == 0:
                self.kv.release(req)
                self.finisher.finish_now(req, FinishReason.length(0))

    def _record_input_logprobs(self, req: Req, it: ExtendItem, rows: torch.Tensor) -> None:
        """Row for absolute position p scores token p+1 of the prompt."""
        first_pos = it.start + it.length - rows.shape[0]
        n_prompt = len(req.input_ids)
        if not req.input_token_logprobs and req.logprob_start_len == 0:
            req.input_token_logprobs.append((None, req.input_ids[0], None))
            req.input_top_logprobs.append(None)
        targets = [
            (i, p + 1)
            for i, p in enumerate(range(first_pos, it.start + it.length))
            if req.logprob_start_len <= p + 1 < n_prompt
        ]
        if not targets:
            return
        sel = rows[[i for i, _ in targets]]
        ids = [req.input_ids[q] for _, q in targets]
        chosen, tops = token_logprobs(sel, ids, req.top_logprobs_num)
        for k, (lp, tid) in enumerate(zip(chosen, ids)):
            req.input_token_logprobs.append((lp, tid, None))
            req.input_top_logprobs.append([(v, t, None) for v, t in tops[k]] if tops else None)

    def _apply_tokens(self, plan: PlannedBatch, result: BatchResult) -> None:
        reqs, tokens, skipped, expect = plan.sample_reqs, result.tokens, result.skipped, plan.expect
        live = [
            i
            for i, req in enumerate(reqs)
            if not skipped[i] and req.reason is None and len(req.output_ids) == expect[i]
        ]
        if None in tokens:
            for i in live:
                if tokens[i] is None:  # invalid distribution: this request alone fails
                    self.end(
                        reqs[i],
                        FinishReason.error(
                            "the sampling distribution is invalid (NaN or no possible token)"
                        ),
                    )
            live = [i for i in live if tokens[i] is not None]
        self._record_logprobs(reqs, live, result)
        self.stats.generated_tokens += len(live)
        ctx, eos = self.config.context_len, self.finisher.eos_ids
        fast = self.hand_off is None
        done: list[tuple[Req, int]] = []
        for i in live:
            req, token = reqs[i], tokens[i]
            assert token is not None
            traits = req.traits or traits_of(req, ctx, eos)
            if not (fast and traits.simple):
                self._append(req, token)
                continue
            # the fast path: what append_token and after_append do for a simple request
            out = req.output_ids
            out.append(token)
            if req.first_token_time is None:
                req.first_token_time = time.perf_counter()
            if token in traits.stop_ids or len(out) >= traits.limit:
                done.append((req, token))
        self._finish_simple(done)

    def _apply_simple(self, plan: PlannedBatch, tokens: list[int]) -> None:
        """A decode batch of simple requests only (``PlannedBatch.simple``), every token
        valid: one loop clears each request's placeholder, appends its token when the row is
        still current and collects the finishing ones; the rest happens once per finish.
        What ``_apply_tokens`` would do, with no per-request call (issue 41). A live row's
        request already holds a token (its extend's, processed before this batch), so its
        ``first_token_time`` is set."""
        done: list[tuple[Req, int]] = []
        live = 0
        for req, token, expect, placeholder in zip(
            plan.sample_reqs, tokens, plan.expect, plan.futures
        ):
            if req.future == placeholder:
                req.future = None
            out = req.output_ids
            if len(out) != expect or req.reason is not None:
                continue  # finished, or the row went stale (see the module docstring)
            out.append(token)
            live += 1
            traits = req.traits
            assert traits is not None  # computed when the batch was planned
            if token in traits.stop_ids or len(out) >= traits.limit:
                done.append((req, token))
        self.stats.generated_tokens += live
        self._finish_simple(done)

    def _finish_simple(self, done: list[tuple[Req, int]]) -> None:
        """The end of the simple requests a step finished, each with its last token (a
        stop token, or the one that reached its length limit): text decoded once, out of
        ``running`` in one pass, KV released, and only then every output emitted. Emitting
        last keeps the waiting caller's thread from taking the GIL back at each torch call of
        the next release, per request (issue 41). An unfinished simple request emits nothing:
        it does not stream."""
        if not done:
            return
        for req, token in done:
            traits = req.traits
            assert traits is not None  # computed when the request was planned
            if token in traits.stop_ids:
                req.finish(FinishReason.stop(token))
            else:
                n, cap = len(req.output_ids), req.sampling.max_new_tokens
                req.finish(FinishReason.length(cap if n >= cap else n))
            self.finisher.finalize_text(req)
        reqs = [req for req, _ in done]
        self.table.remove_all(reqs)
        self.kv.release_all(reqs)
        for req in reqs:
            self.finisher.emit(req)

    def _record_logprobs(self, reqs: list[Req], live: list[int], result: BatchResult) -> None:
        """Logprobs of the sampled tokens, for the live rows that asked (``result.raw`` holds
        one row per ``return_logprob`` request sampled: ``BatchExecutor._sample``)."""
        lp = [i for i in live if reqs[i].return_logprob]
        if not lp:
            return
        raw_row: dict[int, int] = {}
        for i, req in enumerate(reqs):
            if not result.skipped[i] and req.return_logprob:
                raw_row[i] = len(raw_row)
        assert result.raw is not None  # kept for every return_logprob row
        tokens = [t for i in lp if (t := result.tokens[i]) is not None]  # live: none is None
        top_k = max(reqs[i].top_logprobs_num for i in lp)
        chosen, tops = token_logprobs(result.raw[[raw_row[i] for i in lp]], tokens, top_k)
        for k, i in enumerate(lp):
            reqs[i].output_token_logprobs.append((chosen[k], tokens[k], None))
            n = reqs[i].top_logprobs_num
            reqs[i].output_top_logprobs.append(
                [(v, t, None) for v, t in tops[k][:n]] if n else None
            )

    def _append(self, req: Req, token: int) -> None:
        self.finisher.append_token(req, token, self.config.context_len)
        self.after_append(req)

    def after_append(self, req: Req) -> None:
        """What follows new tokens of ``req``: hand-off, jump-forward, finishing (its KV
        released), and its output emitted."""
        if self.hand_off is not None:  # a prefill server: the decode server takes it from here
            self.table.remove(req)
            self.hand_off.hand_off(req)
            return
        jumped = 0
        if req.grammar is not None and not req.finished and self.config.enable_jump_forward:
            jumped = self._jump_forward(req)
        if req.finished:
            self.table.remove(req)
            self.kv.release(req)
        elif jumped:
            self.table.requeue(req)  # forced tokens: extend them in one step, ahead of others
        self.finisher.emit(req)

    def _jump_forward(self, req: Req) -> int:
        """Append the grammar's forced continuation (already accepted by the grammar);
        returns how many tokens it appended."""
        from plait.core.jump_forward import jump_forward_tokens

        tokens = jump_forward_tokens(req.grammar, self.finisher.tokenizer, req.output_ids)
        room = max(
            0,
            min(
                req.sampling.max_new_tokens - len(req.output_ids),
                self.config.context_len - len(req.fill_ids),
                # alone it must still fit the KV pool (decode aborts it there)
                self.kv.num_slots - len(req.fill_ids),
            ),
        )
        if len(tokens) > room:
            req.grammar.rollback(len(tokens) - room)
            tokens = tokens[:room]
        for token in tokens:
            self.finisher.append_token(req, token, self.config.context_len, grammar_accepted=True)
            if req.return_logprob:  # forced: the model did not score it
                req.output_token_logprobs.append((None, token, None))
                req.output_top_logprobs.append(None)
            if req.finished:
                break
        self.stats.jump_forward_tokens += len(tokens)
        return len(tokens)
