"""Owns the model, the KV pool and the attention backend; turns scheduled requests into a
ForwardBatch, runs it and returns logits. Knows nothing about queues or caching policy.

Building (``prepare_*``, which writes the new tokens' slots into ``req_to_token``) and running
(``run``) are separate so the overlap schedule can build batch N+1 on the scheduler thread
while batch N runs on the executor's worker."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from plait.core.forward_batch import ForwardBatch, GreedyTokens
from plait.core.memory import ReqToTokenPool, TokenSlotAllocator
from plait.core.request import Req

if TYPE_CHECKING:  # annotations only: backend_api builds runners, so importing it is a cycle
    from plait.core.backend_api import AttentionBackend, Backend, GraphRunner, KVPool, ModelSpec


@dataclass(kw_only=True)
class ExtendItem:
    """One request's share of an extend batch: tokens ``start..start+length`` of fill_ids."""

    req: Req
    start: int
    length: int
    slots: torch.Tensor           # KV slots for the new tokens
    logit_from: int               # first absolute position whose logits we need


class StepRunner:
    """``forward_extend``/``forward_decode`` (prepare, then run at once) for any runner that
    implements the scheduler's split: ``prepare_extend(items)``, ``prepare_decode(reqs, slots,
    input_ids)`` and ``run(batch)``. The overlap schedule calls the split itself."""

    def forward_extend(self, items: list[ExtendItem]) -> tuple[torch.Tensor, list[int]]:
        """Prefill (chunks of) prompts. Returns logits for the rows each item asked for and,
        per item, how many of those rows are its."""
        batch, row_counts = self.prepare_extend(items)
        return self.run(batch), row_counts

    def forward_decode(self, reqs: list[Req], slots: torch.Tensor) -> torch.Tensor:
        """One new token per request (its last sampled one) at position kv_len."""
        return self.run(self.prepare_decode(reqs, slots, [r.output_ids[-1] for r in reqs]))


class ModelRunner(StepRunner):
    def __init__(self, model: torch.nn.Module, kv_pool: KVPool, attn: AttentionBackend,
                 req_pool: ReqToTokenPool, device: torch.device,
                 graph_runner: GraphRunner | None = None):
        self.model = model
        self.kv_pool = kv_pool
        self.attn = attn
        self.req_pool = req_pool
        self.device = device
        self.graph_runner = graph_runner
        self._facts: dict | None = None

    def metrics(self) -> dict:
        """For ``get_server_info``: whether decode is captured, the graph runner's counters
        (captured batch sizes; the CPU's ``graph_compiles``) and, for Plait's own model,
        ``tp_ranks``: this (single) rank's shard (``plait.core.tp.rank_facts``)."""
        graph = self.graph_runner
        out = {"graph_capture": graph is not None, **(graph.stats() if graph else {})}
        from plait.models.llama import LlamaForCausalLM
        if isinstance(self.model, LlamaForCausalLM):
            if self._facts is None:  # weights and capture are fixed once built
                from plait.core.tp.rank_facts import facts_of
                self._facts = dataclasses.asdict(facts_of(self))
            out["tp_ranks"] = [self._facts]
        return out

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def run(self, batch: ForwardBatch) -> "torch.Tensor | GreedyTokens":
        """Logits ``[len(batch.logits_rows), V]`` (or, for a ``greedy_only`` batch, the model's
        :class:`GreedyTokens` where it computes them); a decode batch replays a captured graph
        when the graph runner can take it."""
        if batch.is_decode and self.graph_runner is not None and self.graph_runner.can_run(batch):
            return self.graph_runner.replay(batch, lambda b: self.model(b, self.attn))
        return self.model(batch, self.attn)

    def prepare_extend(self, items: list[ExtendItem]) -> tuple[ForwardBatch, list[int]]:
        """The extend batch for ``items`` and, per item, how many logits rows are its."""
        r2t = self.req_pool.req_to_token
        input_ids, positions, locs, rows, row_counts = [], [], [], [], []
        for it in items:
            r2t[it.req.req_pool_idx, it.start:it.start + it.length] = it.slots.to(r2t.dtype)
            input_ids.extend(it.req.fill_ids[it.start:it.start + it.length])
            positions.extend(range(it.start, it.start + it.length))
            locs.append(it.slots)
            base = len(input_ids) - it.length
            first = max(it.logit_from, it.start) - it.start
            rows.extend(range(base + first, base + it.length))
            row_counts.append(it.length - first)
        batch = ForwardBatch(
            is_decode=False,
            input_ids=self._tensor(input_ids), positions=self._tensor(positions),
            out_cache_loc=torch.cat(locs).to(self.device),
            req_pool_indices=self._tensor([it.req.req_pool_idx for it in items]),
            seq_lens=self._tensor([it.start + it.length for it in items]),
            prefix_lens=self._tensor([it.start for it in items]),
            extend_lens=self._tensor([it.length for it in items]),
            req_to_token=r2t, logits_rows=self._tensor(rows),
            seq_lens_cpu=[it.start + it.length for it in items],
            prefix_lens_cpu=[it.start for it in items],
            extend_lens_cpu=[it.length for it in items])
        return batch, row_counts

    def prepare_decode(self, reqs: list[Req], slots: torch.Tensor,
                       input_ids: list[int]) -> ForwardBatch:
        """The decode batch: ``input_ids[i]`` (a token, or a future-token placeholder the
        executor resolves) at position ``reqs[i].kv_len``."""
        r2t = self.req_pool.req_to_token
        idx = self._tensor([r.req_pool_idx for r in reqs])
        pos = [r.kv_len for r in reqs]
        r2t[idx, self._tensor(pos)] = slots.to(r2t.dtype)
        seq = [p + 1 for p in pos]
        batch = ForwardBatch(
            is_decode=True,
            input_ids=self._tensor(input_ids),
            positions=self._tensor(pos), out_cache_loc=slots.to(self.device),
            req_pool_indices=idx, seq_lens=self._tensor(seq), prefix_lens=self._tensor(pos),
            extend_lens=self._tensor([1] * len(reqs)), req_to_token=r2t,
            logits_rows=torch.arange(len(reqs), device=self.device),
            seq_lens_cpu=seq, prefix_lens_cpu=pos, extend_lens_cpu=[1] * len(reqs))
        return batch


def build_model_runner(backend: Backend, spec: ModelSpec, num_slots: int, page_size: int,
                       req_pool: ReqToTokenPool) -> tuple[ModelRunner, TokenSlotAllocator]:
    """One rank's runner over its own KV pool (its shard's KV heads, ``num_slots`` slots) and
    the slot allocator, created in the order :class:`Backend` documents."""
    from plait.core.tp.sharding import shard_heads
    from plait.models.llama import head_dim_of

    hf = spec.hf_config
    shard = shard_heads(hf.num_attention_heads, hf.num_key_value_heads, spec.tp.size,
                        spec.tp.rank)
    kv_pool = backend.create_kv_pool(num_slots=num_slots, num_layers=hf.num_hidden_layers,
                                     num_kv_heads=shard.num_kv_heads, head_dim=head_dim_of(hf),
                                     dtype=spec.dtype, page_size=page_size)
    allocator = backend.create_allocator(num_slots=num_slots, page_size=page_size)
    return backend.create_model_runner(spec, kv_pool, req_pool), allocator
