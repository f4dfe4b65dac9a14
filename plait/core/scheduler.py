"""Continuous batching: a waiting queue, a running batch, one forward per ``step()``.

Each step either prefills newly admitted requests (possibly one chunk of a long prompt) or
decodes one token for every running request. Admission is by token budget and free KV; when
decode runs out of KV (after the :class:`~plait.core.kv_manager.KVManager` has evicted what
it could) the scheduler retracts running requests back to the queue (their computed KV stays in
the prefix cache, so resuming is cheap). It never crashes on memory pressure and never drops a
request. Where slots come from and go to is the KVManager's business alone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from plait.core.kv_manager import KVManager, PrefixMatch
from plait.core.model_runner import ExtendItem, ModelRunner
from plait.core.request import Req
from plait.core.request_output import RequestFinisher
from plait.core.sampler import sample, token_logprobs
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


@dataclass
class SchedulerStats:
    prefill_tokens: int = 0      # tokens actually computed in extend steps
    cached_tokens: int = 0       # prompt tokens served from the prefix cache
    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0
    retractions: int = 0
    jump_forward_tokens: int = 0 # grammar-forced output tokens that skipped a decode step


class Scheduler:
    def __init__(self, runner: ModelRunner, kv: KVManager, finisher: RequestFinisher,
                 config: SchedulerConfig):
        self.runner = runner
        self.kv = kv
        self.finisher = finisher
        self.config = config
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked: Req | None = None
        self.new_token_ratio = config.init_new_token_ratio
        self.stats = SchedulerStats()

    # ----- queue management -----

    def add_request(self, req: Req) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked)

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
        return False

    def flush_cache(self) -> bool:
        """Drop the prefix cache; refused while requests hold cached prefixes."""
        if self.has_work():
            return False
        self.kv.flush()
        return True

    # ----- one step -----

    @torch.inference_mode()
    def step(self) -> None:
        items = self._schedule_prefill()
        if items:
            self._guarded(self._run_extend, items, [it.req for it in items])
        elif self.running:
            self._guarded(self._run_decode, None, list(self.running))
        else:  # nothing fits and nothing runs: KV held for jump-forward tokens must go
            self._release_pending_jumps()

    def _guarded(self, fn: Any, arg: Any, reqs: list[Req]) -> None:
        """A failing forward finishes its own batch with an error; the engine lives on."""
        try:
            fn(arg) if arg is not None else fn()
        except Exception as exc:  # noqa: BLE001 - isolate the failure to this batch
            log.exception("forward failed; aborting %d request(s)", len(reqs))
            for req in reqs:
                self._fail(req, f"internal error: {exc}")

    def _fail(self, req: Req, message: str) -> None:
        """Finish ``req`` with an engine error (``{"type": "error"}``: the server reports it as
        a 5xx, never as a normal finish) and free everything it holds."""
        if req in self.running:
            self.running.remove(req)
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
        return ExtendItem(req, start, length, slots, logit_from)

    def _run_extend(self, items: list[ExtendItem]) -> None:
        logits, counts = self.runner.forward_extend(items)
        self.stats.forward_passes += 1
        row = 0
        to_sample: list[tuple[Req, torch.Tensor]] = []
        for it, count in zip(items, counts):
            req = it.req
            rows = logits[row:row + count]
            row += count
            req.kv_len = it.start + it.length
            self.stats.prefill_tokens += it.length
            if req.wants_input_logprobs:
                self._record_input_logprobs(req, it, rows)
            self.kv.cache_unfinished(req)
            if req.kv_len < len(req.fill_ids):
                self.chunked = req
            elif req.sampling.max_new_tokens == 0:
                self.kv.release(req)
                self._finish_now(req, {"type": "length", "length": 0})
            else:
                to_sample.append((req, rows[-1]))
        if to_sample:
            reqs = [r for r, _ in to_sample]
            self._sample_and_process(reqs, torch.stack([lg for _, lg in to_sample]))

    def _record_input_logprobs(self, req: Req, it: ExtendItem, rows: torch.Tensor) -> None:
        """Row for absolute position p scores token p+1 of the prompt."""
        first_pos = it.start + it.length - rows.shape[0]
        n_prompt = len(req.input_ids)
        if not req.input_token_logprobs and req.logprob_start_len == 0:
            req.input_token_logprobs.append((None, req.input_ids[0], None))
            req.input_top_logprobs.append(None)
        targets = [(i, p + 1) for i, p in enumerate(range(first_pos, it.start + it.length))
                   if req.logprob_start_len <= p + 1 < n_prompt]
        if not targets:
            return
        sel = rows[[i for i, _ in targets]]
        ids = [req.input_ids[q] for _, q in targets]
        chosen, tops = token_logprobs(sel, ids, req.top_logprobs_num)
        for k, (lp, tid) in enumerate(zip(chosen, ids)):
            req.input_token_logprobs.append((lp, tid, None))
            req.input_top_logprobs.append([(v, t, None) for v, t in tops[k]] if tops else None)

    # ----- decode -----

    def _run_decode(self) -> None:
        slots = self._alloc_decode_slots()
        if slots is None:
            return
        reqs = list(self.running)
        logits = self.runner.forward_decode(reqs, slots)
        self.stats.forward_passes += 1
        for req in reqs:
            req.kv_len += 1
        self.new_token_ratio = max(self.config.min_new_token_ratio,
                                   self.new_token_ratio - self.config.new_token_ratio_decay)
        self._sample_and_process(reqs, logits)

    def _alloc_decode_slots(self) -> torch.Tensor | None:
        """One slot per running request, retracting requests until it fits."""
        while self.running:
            slots = self.kv.alloc_decode(self.running)
            if slots is not None:
                return slots
            if self._release_pending_jumps():
                continue
            if len(self.running) == 1:
                req = self.running.pop()
                self.kv.release(req)
                self._finish_now(req, {"type": "abort",
                                       "message": "KV cache too small for this request"})
                return None
            self._retract_one()
        return None

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

    # ----- sampling and outputs -----

    def _sample_and_process(self, reqs: list[Req], logits: torch.Tensor) -> None:
        want_lp = [r.return_logprob for r in reqs]
        raw = logits.clone() if any(want_lp) else logits
        tokens = sample(logits, reqs, self.finisher.eos_ids)
        bad = [i for i, t in enumerate(tokens) if t is None]
        if bad:  # an invalid distribution fails its own request; the rest go on unchanged
            for i in bad:
                self._fail(reqs[i], "the sampling distribution is invalid (NaN or no "
                                    "possible token)")
            keep = [i for i, t in enumerate(tokens) if t is not None]
            reqs, tokens, want_lp = ([reqs[i] for i in keep], [tokens[i] for i in keep],
                                     [want_lp[i] for i in keep])
            raw = raw[keep]
        if any(want_lp):
            idx = [i for i, w in enumerate(want_lp) if w]
            top_k = max(reqs[i].top_logprobs_num for i in idx)
            chosen, tops = token_logprobs(raw[idx], [tokens[i] for i in idx], top_k)
            for k, i in enumerate(idx):
                reqs[i].output_token_logprobs.append((chosen[k], tokens[i], None))
                n = reqs[i].top_logprobs_num
                reqs[i].output_top_logprobs.append(
                    [(v, t, None) for v, t in tops[k][:n]] if n else None)
        self.stats.generated_tokens += len(tokens)
        for req, token in zip(reqs, tokens):
            self.finisher.append_token(req, token, self.config.context_len)
            if req.grammar is not None and not req.finished and self.config.enable_jump_forward:
                self._jump_forward(req)
            if req.finished:
                if req in self.running:
                    self.running.remove(req)
                self.kv.release(req)
            elif len(req.fill_ids) - req.kv_len > 1:
                # jump-forward appended tokens: extend them in one step, ahead of new requests
                if req in self.running:
                    self.running.remove(req)
                self.waiting.insert(0, req)
            elif req not in self.running:
                self.running.append(req)
            self.finisher.emit(req)

    def _jump_forward(self, req: Req) -> None:
        """Append the grammar's forced continuation (already accepted by the grammar)."""
        from plait.core.jump_forward import jump_forward_tokens
        tokens = jump_forward_tokens(req.grammar, self.finisher.tokenizer, req.output_ids)
        room = max(0, min(req.sampling.max_new_tokens - len(req.output_ids),
                          self.config.context_len - len(req.fill_ids),
                          # alone it must still fit the KV pool (decode aborts it there)
                          self.kv.num_slots - len(req.fill_ids)))
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

    def _finish_now(self, req: Req, reason: dict) -> None:
        req.finish(reason)
        self.finisher.finalize_text(req)
        self.finisher.emit(req)

    # ----- admission budget -----

    def _decode_reservation(self, reqs: list[Req]) -> int:
        return int(sum(max(r.sampling.max_new_tokens - len(r.output_ids), 0)
                       for r in reqs) * self.new_token_ratio)
