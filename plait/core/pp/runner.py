"""Rank 0's model runner under pipeline parallelism, and starting the pipeline.

It is the tensor-parallel rank-0 runner (:class:`~plait.core.tp.runner.TPModelRunner`: the
batch broadcast, the broken-group guard, the STOP at shutdown) with its own forward: rank 0's
stage of the pipeline (``pipeline.run_stage``), which returns the last rank's logits. The
worker ranks are started by the tensor-parallel launcher and run its worker loop; only their
``pp_size`` in the worker config differs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from plait.core.backend_api import Backend, ModelSpec, StepRunner
from plait.core.forward_batch import GreedyTokens
from plait.core.memory import ReqToTokenPool, TokenSlotAllocator
from plait.core.model_runner import build_model_runner
from plait.core.pp.pipeline import StageFacts, run_stage, stage_facts
from plait.core.pp.stage import PPStage
from plait.core.tp.launcher import WorkerRanks
from plait.core.tp.runner import TPModelRunner, worker_config_of


class PPModelRunner(TPModelRunner):
    """Rank 0's :class:`~plait.core.backend_api.StepRunner`: broadcasts each batch, runs its
    stage's micro-batches and returns the logits the last rank sends back."""

    def __init__(self, local: StepRunner, ranks: WorkerRanks, stage: PPStage):
        super().__init__(local, ranks)
        self.stage = stage
        #: rank 0's stage model: the engine reads its RoPE regime lengths from it (the prefix
        #: cache's split, longrope's re-prefill), which are the whole model's
        model: Any = self.local.model
        self.model = model
        config = model.config
        self._sizes = (int(config.hidden_size), int(config.vocab_size))
        #: every rank's stage, rank 0's first (the workers' arrived with their ready signal)
        self.stage_facts: list[StageFacts] = [stage_facts(self.local, stage), *ranks.facts]

    def metrics(self) -> dict[str, Any]:
        """For ``get_server_info``: ``pp_ranks``, one :class:`StageFacts` dict per rank
        (which layers it holds, its KV layers, embedding, LM head, weight bytes)."""
        out = self.local.metrics()
        out.pop("tp_ranks", None)
        return {**out, "pp_ranks": [dataclasses.asdict(f) for f in self.stage_facts]}

    def shutdown(self) -> None:
        """STOP the ranks; after a failed forward a rank may wait in a point-to-point
        receive, where the STOP broadcast cannot reach it, so they are killed instead."""
        if self._broken is not None:
            self.ranks.stop()
        else:
            super().shutdown()

    def _forward(self, batch: Any) -> torch.Tensor | GreedyTokens:
        logits = run_stage(self.local, self.stage, batch, *self._sizes)
        assert logits is not None, "rank 0 receives the logits"
        return logits


def start_pipeline_parallel(
    backend: Backend,
    spec: ModelSpec,
    num_slots: int,
    page_size: int,
    req_pool: ReqToTokenPool,
    pp_size: int,
    startup_timeout: float = 600.0,
) -> tuple[PPModelRunner, TokenSlotAllocator]:
    """Start ranks 1..pp_size-1, build rank 0's stage (this process) while they build theirs,
    join the group; returns rank 0's runner and the slot allocator (rank 0 owns allocation;
    every rank's pool has the same slots)."""
    layers = int(spec.hf_config.num_hidden_layers)
    PPStage(rank=0, size=pp_size, num_layers=layers)  # refuses too few layers before any start
    worker_config = {**worker_config_of(backend, spec, num_slots, page_size), "pp_size": pp_size}
    cpu = backend.torch_device.type == "cpu"
    ranks = WorkerRanks(
        pp_size,
        backend.distributed_backend,
        worker_config,
        cpu_threads=cpu,
        parse_facts=StageFacts.from_json,
    )
    try:
        backend.bind_tp_rank(0)
        stage = PPStage(rank=0, size=pp_size, num_layers=layers)
        local, allocator = build_model_runner(
            backend, dataclasses.replace(spec, pp=stage), num_slots, page_size, req_pool
        )
        ranks.wait_ready(startup_timeout)
        runner = PPModelRunner(local, ranks, stage)
        ranks.join()
    except BaseException:
        ranks.stop()
        raise
    return runner, allocator
