"""Admission: which requests the next extend batch computes, and how much of each.

One :class:`PrefillAdder` plans one round. It holds the round's token budget
(``chunked_prefill_size``, else ``max_prefill_tokens``), the in-batch prefix dedup and the KV
reserved for the decode steps that running and admitted requests still have ahead.

What holds after a round:
- The half-prefilled prompt (``ReqTable.chunked``) goes first; while it still has chunks left
  nothing else is admitted: one chunked request at a time.
- A request is admitted only if the KV it needs now, plus the reservation, is free (eviction
  counted); the reservation is waived when nothing runs, so a lone request always starts.
- Without chunked prefill a prompt longer than the budget goes alone, in a later round.
- Decodes riding in the same forward (``enable_mixed_chunk``) take one token of the budget
  each; when they take it all, nothing is extended this round.
- Every planned item holds its KV slots; admitted requests have left ``waiting``. A request
  whose allocation fails stays queued and holds nothing it did not hold before.
- The running, chunked and admitted requests use at most ``max_loras_per_batch`` distinct
  LoRA adapters (the adapter pool's slots): a request on one more waits, and requests
  behind it may still be admitted.
"""

from __future__ import annotations

from plait.core.kv_manager import KVManager, PrefixMatch
from plait.core.model_runner import ExtendItem
from plait.core.req_table import ReqTable
from plait.core.request import Req
from plait.core.schedule_policy import InBatchPrefixDedup, order_waiting
from plait.core.scheduler_config import SchedulerConfig, SchedulerStats


def decode_reservation(reqs: list[Req], new_token_ratio: float) -> int:
    """KV to keep free for ``reqs``' remaining output: a ``new_token_ratio`` share of it."""
    return int(
        sum(max(r.sampling.max_new_tokens - len(r.output_ids), 0) for r in reqs) * new_token_ratio
    )


class PrefillAdder:
    """Plans one extend batch (see the module docstring for what holds)."""

    def __init__(
        self,
        kv: KVManager,
        table: ReqTable,
        stats: SchedulerStats,
        config: SchedulerConfig,
        new_token_ratio: float,
        decode_rows: int = 0,
    ):
        """``decode_rows``: running requests decoded in the same forward (mixed chunk,
        ``mixed.py``); each takes one token of the round's budget."""
        self.kv = kv
        self.table = table
        self.stats = stats
        self.config = config
        self.ratio = new_token_ratio
        self.budget = (config.chunked_prefill_size or config.max_prefill_tokens) - decode_rows
        self.items: list[ExtendItem] = []
        self.dedup = InBatchPrefixDedup()
        self.reserved = 0
        self._adapters: set[str] | None = None

    @property
    def adapters(self) -> set[str]:
        """The adapters the running, chunked and admitted requests use; worked out on first
        use, so a step that admits no LoRA request never walks ``running`` (issue 41)."""
        if self._adapters is None:
            held = [*self.table.running, *([self.table.chunked] if self.table.chunked else [])]
            self._adapters = {r.lora_id for r in held if r.lora_id is not None}
        return self._adapters

    def schedule(self) -> list[ExtendItem]:
        """The round's items: the chunked prompt's next chunk, then admitted requests."""
        if not self._continue_chunked() or not self.table.waiting:
            return self.items
        self.reserved = decode_reservation(self.table.running, self.ratio)
        for req in order_waiting(self.table.waiting, self.config.schedule_policy, self.kv):
            if not self._try_add(req):
                break
        return self.items

    def _continue_chunked(self) -> bool:
        """Plan the chunked prompt's next chunk; False when nothing else may join."""
        req, self.table.chunked = self.table.chunked, None
        if req is None:
            return True
        item = plan_chunk(self.kv, req, self.budget) if self.budget > 0 else None
        if item is None:
            self.table.chunked = req
            return False
        self._add(item, item.length)
        return req.kv_len + item.length == len(req.fill_ids)

    def _try_add(self, req: Req) -> bool:
        """Admit ``req`` if it fits; False when this round takes no more requests."""
        cfg = self.config
        if (
            self.budget <= 0
            or len(self.table.running) + len(self.items) >= cfg.max_running_requests
        ):
            return False
        if not self._adapter_fits(req):
            return True  # waits for a slot; later requests may still fit
        prefix: PrefixMatch | None = None
        if req.req_pool_idx is not None:
            # holds its KV already (jump-forward tokens to extend): no admission needed
            extend = len(req.fill_ids) - req.kv_len
        else:
            prefix = self.kv.match(req)
            if self.dedup.should_defer(req.fill_ids, prefix.length):
                return True  # a request admitted this round computes its prefix
            extend = len(req.fill_ids) - prefix.length
        if cfg.chunked_prefill_size is None and extend > self.budget and self.items:
            return False  # an unchunked long prompt goes alone in the next step
        need = min(extend, self.budget) if cfg.chunked_prefill_size else extend
        reserve = self.reserved + decode_reservation([req], self.ratio)
        nothing_running = not self.table.running and not self.items
        if self.kv.free_tokens() < need + (0 if nothing_running else reserve):
            return False
        item = plan_chunk(self.kv, req, need) if prefix is None else self._admit(req, prefix, need)
        if item is None:
            return False
        self.table.waiting.remove(req)
        self._add(item, need)
        self.reserved = reserve
        return item.length == extend  # a chunked one continues next step, alone

    def _adapter_fits(self, req: Req) -> bool:
        limit = self.config.max_loras_per_batch
        if req.lora_id is None or req.lora_id in self.adapters or limit is None:
            return True
        return len(self.adapters) < limit

    def _add(self, item: ExtendItem, cost: int) -> None:
        if item.req.lora_id is not None:
            self.adapters.add(item.req.lora_id)
        self.items.append(item)
        self.dedup.add(item.req.fill_ids)
        self.budget -= cost

    def _admit(self, req: Req, prefix: PrefixMatch, need: int) -> ExtendItem | None:
        """Give ``req`` a KV row on ``prefix`` and slots for its first ``need`` tokens."""
        if not self.kv.admit(req, prefix):
            return None
        p = prefix.length
        if not req.output_ids:  # first admission (not a resumed retraction)
            req.cached_tokens = p
            self.stats.cached_tokens += p
            self.stats.prompt_tokens += len(req.input_ids)
        item = plan_chunk(self.kv, req, need)
        if item is None:
            self.kv.release(req)
        return item


def plan_chunk(kv: KVManager, req: Req, budget: int) -> ExtendItem | None:
    """Allocate KV for the next ``<= budget`` tokens of ``req``'s pending fill."""
    start = req.kv_len
    length = min(len(req.fill_ids) - start, budget)
    slots = kv.alloc_extend(req, length)
    if slots is None:
        return None
    final = start + length == len(req.fill_ids)
    if req.wants_input_logprobs:
        logit_from = max(req.logprob_start_len - 1, 0)
    else:
        logit_from = start + length - 1 if final else start + length
    return ExtendItem(req=req, start=start, length=length, slots=slots, logit_from=logit_from)
