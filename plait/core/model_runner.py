"""Owns the model, the KV pool and the attention backend; turns scheduled requests into a
ForwardBatch, runs it and returns logits. Knows nothing about queues or caching policy.

Building (``prepare_*``, which writes the new tokens' slots into ``req_to_token``) and running
(``run``) are separate so the overlap schedule can build batch N+1 on the scheduler thread
while batch N runs on the executor's worker."""

from __future__ import annotations

import dataclasses
from array import array
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from plait.core.forward_batch import ExtendItem, ForwardBatch, GreedyTokens
from plait.core.kv_layout import create_kv_pool, declared_layout, head_dim_of
from plait.core.memory import ReqToTokenPool, TokenSlotAllocator
from plait.core.mla import LatentKVPool
from plait.core.request import Req

if TYPE_CHECKING:
    from plait.core.backend_api import (
        AttentionBackend,
        Backend,
        GraphRunner,
        KVPool,
        ModelSpec,
        StepRunner,
    )

__all__ = [
    "ExtendItem",
    "ModelRunner",
    "build_model_runner",
    "default_model_runner",
    "head_dim_of",
]


class AdapterHook(Protocol):
    """What the runner calls around a forward that carries LoRA adapters
    (``plait.lora.manager.LoraManager``): ``begin`` makes them resident and publishes the
    batch's layout to the model, ``end`` withdraws it."""

    def begin(self, batch: ForwardBatch) -> None: ...
    def end(self) -> None: ...


class ModelRunner:
    """The core's :class:`~plait.core.backend_api.StepRunner` over a torch model.

    ``adapters``: set once LoRA adapters are enabled; a batch with ``lora_ids`` runs through
    it and never replays a captured graph (the graph holds no adapter)."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_pool: KVPool,
        attn: AttentionBackend,
        req_pool: ReqToTokenPool,
        device: torch.device,
        graph_runner: GraphRunner | None = None,
    ):
        self.model = model
        self.kv_pool = kv_pool
        self.attn = attn
        self.req_pool = req_pool
        self.device = device
        self.graph_runner = graph_runner
        self.adapters: AdapterHook | None = None
        self._facts: dict | None = None
        self._constants: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def metrics(self) -> dict[str, Any]:
        """For ``get_server_info``: whether decode is captured, the graph runner's counters
        (captured batch sizes; the CPU's ``graph_compiles``) and, for a model with Plait's
        Llama layout, ``tp_ranks``: this (single) rank's shard (``plait.core.tp.rank_facts``)."""
        graph = self.graph_runner
        out = {"graph_capture": graph is not None, **(graph.stats() if graph else {})}
        from plait.core.tp.rank_facts import facts_of, has_facts

        if has_facts(self.model):
            if self._facts is None:  # weights and capture are fixed once built
                self._facts = dataclasses.asdict(facts_of(self))
            out["tp_ranks"] = [self._facts]
        return out

    @property
    def decode_shaped_verify(self) -> bool:
        """Whether speculative verify passes go decode-shaped (:meth:`prepare_verify`) rather
        than as an extend: where the model decodes through a backend's native one-call step
        (``decode_forward``, the CPU's C++ step). There the extend step calls attention once
        per request and layer from Python while the decode step attends for every row in one
        call (a batch-16 verify pass measured 10-20% faster); elsewhere the backend's extend
        kernel (Triton's is varlen) verifies."""
        return getattr(self.model, "decode_forward", None) is not None

    def _tensor(self, values: list[int] | list[int | None]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def run(self, batch: ForwardBatch) -> "torch.Tensor | GreedyTokens":
        """Logits ``[len(batch.logits_rows), V]`` (or, for a ``greedy_only`` batch, the model's
        :class:`GreedyTokens` where it computes them); a decode batch replays a captured graph
        when the graph runner can take it."""
        if batch.lora_ids is not None:
            if self.adapters is None:
                raise ValueError("lora_path: this engine has no LoRA adapters enabled")
            self.adapters.begin(batch)
            try:
                return self.model(batch, self.attn)
            finally:
                self.adapters.end()
        if batch.is_decode and self.graph_runner is not None and self.graph_runner.can_run(batch):
            return self.graph_runner.replay(batch, lambda b: self.model(b, self.attn))
        return self.model(batch, self.attn)

    def prepare_extend(self, items: list[ExtendItem]) -> tuple[ForwardBatch, list[int]]:
        """The extend batch for ``items`` and, per item, how many logits rows are its."""
        r2t = self.req_pool.req_to_token
        input_ids: list[int] = []
        positions: list[int] = []
        locs: list[torch.Tensor] = []
        rows: list[int] = []
        row_counts: list[int] = []
        for it in items:
            r2t[it.req.req_pool_idx, it.start : it.start + it.length] = it.slots.to(r2t.dtype)
            input_ids.extend(it.token_ids)
            positions.extend(range(it.start, it.start + it.length))
            locs.append(it.slots)
            base = len(input_ids) - it.length
            first = max(it.logit_from, it.start) - it.start
            rows.extend(range(base + first, base + it.length))
            row_counts.append(it.length - first)
        batch = ForwardBatch(
            is_decode=False,
            input_ids=self._tensor(input_ids),
            positions=self._tensor(positions),
            out_cache_loc=torch.cat(locs).to(self.device),
            req_pool_indices=self._tensor([it.req.req_pool_idx for it in items]),
            seq_lens=self._tensor([it.start + it.length for it in items]),
            prefix_lens=self._tensor([it.start for it in items]),
            extend_lens=self._tensor([it.length for it in items]),
            req_to_token=r2t,
            logits_rows=self._tensor(rows),
            seq_lens_cpu=[it.start + it.length for it in items],
            prefix_lens_cpu=[it.start for it in items],
            extend_lens_cpu=[it.length for it in items],
            lora_ids=_lora_ids([it.req for it in items]),
        )
        return batch, row_counts

    def prepare_verify(self, items: list[ExtendItem]) -> tuple[ForwardBatch, list[int]]:
        """A speculative verify pass shaped as a decode batch: one row per token of every
        item (its last token and drafts), each row a query over its request's KV up to and
        including itself. A decode step writes every row's K/V before any row attends, so
        row ``i`` sees the rows before it; every row gets logits. Same answer as
        ``prepare_extend(items)`` (logits for every row), through the decode kernels."""
        r2t = self.req_pool.req_to_token
        ids: list[int] = []
        pos: list[int] = []
        rows: list[int] = []
        for it in items:
            row = it.req.req_pool_idx
            assert row is not None, "a verified request holds a KV row"
            r2t[row, it.start : it.start + it.length] = it.slots.to(r2t.dtype)
            ids.extend(it.token_ids)
            pos.extend(range(it.start, it.start + it.length))
            rows.extend([row] * it.length)
        seq = [p + 1 for p in pos]
        batch = ForwardBatch(
            is_decode=True,
            input_ids=self._tensor(ids),
            positions=self._tensor(pos),
            out_cache_loc=torch.cat([it.slots for it in items]).to(self.device),
            req_pool_indices=self._tensor(rows),
            seq_lens=self._tensor(seq),
            prefix_lens=self._tensor(pos),
            extend_lens=self._tensor([1] * len(ids)),
            req_to_token=r2t,
            logits_rows=torch.arange(len(ids), device=self.device),
            seq_lens_cpu=seq,
            prefix_lens_cpu=pos,
            extend_lens_cpu=[1] * len(ids),
        )
        return batch, [it.length for it in items]

    def prepare_decode(
        self, reqs: list[Req], slots: torch.Tensor, input_ids: list[int]
    ) -> ForwardBatch:
        """The decode batch: ``input_ids[i]`` (a token, or a future-token placeholder the
        executor resolves) at position ``reqs[i].kv_len``.

        Built with one host-to-tensor conversion (rows, positions and inputs in one int64
        buffer, split into views) and cached ``arange``/ones per batch size: at batch 256 each
        ``torch.tensor(list)`` cost ~20 us of the host path (issue 41). The shared tensors are
        never written by a forward (nothing modifies a batch's metadata in place)."""
        n = len(reqs)
        pos = [r.kv_len for r in reqs]
        # one conversion of one list: ``array.extend`` from a list converts item by item
        # (~0.14 us each, 3x ``array(list)``)
        pool = cast("list[int]", [r.req_pool_idx for r in reqs])  # all admitted
        host = array("q", pool + pos + input_ids)
        packed = (
            torch.frombuffer(host, dtype=torch.int64) if n else torch.empty(0, dtype=torch.int64)
        ).to(self.device)
        idx, positions, ids = packed[:n], packed[n : 2 * n], packed[2 * n :]
        r2t = self.req_pool.req_to_token
        r2t[idx, positions] = slots.to(r2t.dtype)
        rows, ones = self._decode_constants(n)
        return ForwardBatch(
            is_decode=True,
            input_ids=ids,
            positions=positions,
            out_cache_loc=slots.to(self.device),
            req_pool_indices=idx,
            seq_lens=positions + 1,
            prefix_lens=positions,
            extend_lens=ones,
            req_to_token=r2t,
            logits_rows=rows,
            seq_lens_cpu=[p + 1 for p in pos],
            prefix_lens_cpu=pos,
            extend_lens_cpu=[1] * n,
            lora_ids=_lora_ids(reqs),
        )

    def _decode_constants(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``arange(n)`` (the logits rows) and ``n`` ones (the extend lengths), made once."""
        got = self._constants.get(n)
        if got is None:
            got = self._constants[n] = (
                torch.arange(n, device=self.device),
                torch.ones(n, dtype=torch.int64, device=self.device),
            )
        return got


def _lora_ids(reqs: list[Req]) -> list[str | None] | None:
    ids = [r.lora_id for r in reqs]
    return None if ids.count(None) == len(ids) else ids


def default_model_runner(
    backend: Backend, spec: ModelSpec, kv_pool: KVPool, req_pool: ReqToTokenPool
) -> ModelRunner:
    """The runner a backend gets unless it returns its own from ``create_model_runner``:
    ``spec.load_model``'s torch model on the backend's device with its attention and (when
    ``spec.graph_capture``) graph runner over ``kv_pool``."""
    if spec.load_model is None:
        raise ValueError(
            f"backend {backend.name!r} uses the core's model runner, which needs "
            "ModelSpec.load_model (the composition root sets it from the model "
            "registry)"
        )
    device, quant = backend.torch_device, spec.quantization
    matmul = (
        backend.quantized_linear(quant.method, quant.activations)
        if quant.method != "none"
        else None
    )
    load = spec.load_model
    model = load(dataclasses.replace(spec, fused_moe=backend.fused_moe()), device, matmul)
    layers: Any = model.layers
    heads = layers[0].self_attn  # this rank's heads
    attn: Any
    if isinstance(kv_pool, LatentKVPool):
        attn = backend.create_mla_attention_backend(kv_pool, heads.num_heads, heads.scaling)
    else:
        attn = backend.create_attention_backend(
            kv_pool, heads.num_heads, heads.num_kv_heads, head_dim_of(spec.hf_config)
        )
    windows: tuple[int | None, ...] = model.sliding_windows  # type: ignore[assignment]
    attn.set_sliding_windows(windows)
    # optional per-layer attention settings (Gemma's): absent means the defaults
    attn.set_layer_scales(tuple(getattr(model, "attention_scales", ())))
    attn.set_logit_softcaps(tuple(getattr(model, "attention_softcaps", ())))
    graph = backend.create_graph_runner(model, spec.max_batch_size) if spec.graph_capture else None
    return ModelRunner(model, kv_pool, attn, req_pool, device, graph)


def build_model_runner(
    backend: Backend, spec: ModelSpec, num_slots: int, page_size: int, req_pool: ReqToTokenPool
) -> tuple[StepRunner, TokenSlotAllocator]:
    """One rank's runner over its own KV pool (``num_slots`` slots in the layout the model's
    loader declares for this rank: its shard's K/V heads, or a latent) and the slot
    allocator, created in the order :class:`Backend` documents."""
    layout = declared_layout(spec.load_model, spec.hf_config, spec.tp.size, spec.tp.rank)
    if spec.pp.partial:  # a pipeline stage keeps the KV of its own layers only
        layout = dataclasses.replace(layout, num_layers=spec.pp.held_layers)
    kv_pool = create_kv_pool(backend, layout, num_slots, spec.dtype, page_size)
    allocator = backend.create_allocator(num_slots=num_slots, page_size=page_size)
    runner = backend.create_model_runner(spec, kv_pool, req_pool)
    if runner is None:
        runner = default_model_runner(backend, spec, kv_pool, req_pool)
    return runner, allocator
