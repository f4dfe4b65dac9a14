"""Rank 0's model runner under tensor parallelism: the scheduler calls it exactly like a
:class:`~plait.core.model_runner.ModelRunner`.

Each forward builds the batch on rank 0 (slots written into rank 0's ``req_to_token``),
broadcasts it (``batch_channel``), then runs rank 0's shard; the model's all-reduces and the
logits all-gather meet the workers' in the same order, so rank 0 returns the full logits.
A failed forward leaves the group in an unknown state (some rank may wait in a collective
forever), so after one every later forward raises instead of deadlocking.

Every rank is built from the engine's one :class:`ModelSpec` with only ``tp`` replaced (rank 0
here, the workers from the same fields in their JSON config), so a flag such as
``graph_capture`` holds on every rank; :meth:`TPModelRunner.metrics` reports each rank's
:class:`~plait.core.tp.rank_facts.RankFacts` so that this can be seen.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from plait.core.backend_api import Backend, ModelSpec, StepRunner
from plait.core.forward_batch import GreedyTokens
from plait.core.memory import ReqToTokenPool, TokenSlotAllocator
from plait.core.model_runner import ExtendItem, ModelRunner, build_model_runner
from plait.core.request import Req
from plait.core.tp import batch_channel
from plait.core.tp.group import TPGroup
from plait.core.tp.launcher import WorkerRanks
from plait.core.tp.rank_facts import RankFacts, facts_of


class TPModelRunner:
    """Rank 0's :class:`~plait.core.backend_api.StepRunner`: its own shard's
    :class:`ModelRunner`, broadcasting each batch to the other ranks before running it."""

    def __init__(self, local: StepRunner, ranks: WorkerRanks):
        if not isinstance(local, ModelRunner):
            raise ValueError(
                f"tensor parallelism needs the core ModelRunner; the backend "
                f"returned {type(local).__name__}"
            )
        self.local = local
        self.ranks = ranks
        self.kv_pool = local.kv_pool
        self.req_pool = local.req_pool
        self.device = local.device
        #: rank 0's graph runner: the engine warms decode capture up through it (the workers
        #: run the same warm-up batches, so they capture the same sizes)
        self.graph_runner = local.graph_runner
        #: every rank's shard, rank 0's first (the workers' arrived with their ready signal)
        self.rank_facts: list[RankFacts] = [facts_of(local), *ranks.facts]
        self._broken: str | None = None

    def metrics(self) -> dict[str, Any]:
        """For ``get_server_info``: rank 0's capture counters and ``tp_ranks``, one
        :class:`RankFacts` dict per rank."""
        return {
            **self.local.metrics(),
            "tp_ranks": [dataclasses.asdict(f) for f in self.rank_facts],
        }

    def prepare_extend(self, items: list[ExtendItem]) -> tuple[Any, list[int]]:
        return self.local.prepare_extend(items)

    def prepare_decode(self, reqs: list[Req], slots: torch.Tensor, input_ids: list[int]) -> Any:
        return self.local.prepare_decode(reqs, slots, input_ids)

    def run(self, batch: Any) -> torch.Tensor | GreedyTokens:
        """Broadcast the (placeholder-resolved) batch, then run rank 0's shard: called on the
        overlap worker thread, which thereby is the only thread issuing collectives."""
        if self._broken is not None:
            raise RuntimeError(f"the tensor-parallel group is broken: {self._broken}")
        try:
            batch_channel.send_batch(batch)
            return self._forward(batch)
        except Exception as exc:
            dead = self.ranks.dead_ranks()
            self._broken = f"ranks {dead} exited" if dead else f"a forward failed: {exc!r}"
            raise RuntimeError(f"tensor-parallel forward failed ({self._broken})") from exc

    def _forward(self, batch: Any) -> torch.Tensor | GreedyTokens:
        """Rank 0's part of the forward, once the batch is broadcast (pipeline parallelism
        overrides it)."""
        return self.local.run(batch)

    def shutdown(self) -> None:
        self.ranks.stop(send_stop=lambda: batch_channel.send_stop(self.device))


def start_tensor_parallel(
    backend: Backend,
    spec: ModelSpec,
    num_slots: int,
    page_size: int,
    req_pool: ReqToTokenPool,
    tp_size: int,
    startup_timeout: float = 600.0,
    kv_transfer: dict[str, Any] | None = None,
) -> tuple[TPModelRunner, TokenSlotAllocator]:
    """Start ranks 1..tp_size-1, build rank 0's shard (this process) while they build theirs,
    join the group; returns rank 0's runner and the slot allocator (rank 0 owns allocation).
    ``kv_transfer`` (prefill/decode disaggregation: ``backend``, ``host``, ``mode``): each
    worker also starts a ``plait.disaggregation.rank_agent.RankAgent`` over its KV shard and
    publishes its facts as ``kv`` (:meth:`WorkerRanks.published`)."""
    if spec.quantization.method != "none":  # the loader's refusal, before any rank starts
        raise ValueError(
            f"quantization={spec.quantization.method!r} does not support tp_size > 1 yet"
        )
    cpu = backend.torch_device.type == "cpu"
    worker_config = {
        **worker_config_of(backend, spec, num_slots, page_size),
        "kv_transfer": kv_transfer,
    }
    ranks = WorkerRanks(tp_size, backend.distributed_backend, worker_config, cpu_threads=cpu)
    try:
        backend.bind_tp_rank(0)
        local, allocator = build_model_runner(
            backend,
            dataclasses.replace(spec, tp=TPGroup(rank=0, size=tp_size)),
            num_slots,
            page_size,
            req_pool,
        )
        ranks.wait_ready(startup_timeout)
        runner = TPModelRunner(local, ranks)
        ranks.join()
    except BaseException:
        ranks.stop()
        raise
    return runner, allocator


def worker_config_of(
    backend: Backend, spec: ModelSpec, num_slots: int, page_size: int
) -> dict[str, Any]:
    """What a worker rank builds its runner from (``plait.core.tp.worker``): every ModelSpec
    field but hf_config (re-read from model_dir) and tp/pp (the rank's own)."""
    return {
        "model_dir": str(spec.model_dir),
        "device": backend.name,
        "dtype": str(spec.dtype).removeprefix("torch."),
        "context_len": spec.context_len,
        "max_batch_size": spec.max_batch_size,
        "num_slots": num_slots,
        "page_size": page_size,
        "graph_capture": spec.graph_capture,
        "backend_options": (
            dataclasses.asdict(backend.options)  # type: ignore[call-overload]
            if backend.options is not None
            else None
        ),
    }
