"""A tensor- or pipeline-parallel worker rank (1..N-1): ``python -m plait.core.tp.worker
'<json config>'``.

It loads its shard of the model and its KV pool (its KV heads only; a pipeline rank: its
layers and their KV, ``plait.core.pp``), reports ready (with its
:class:`~plait.core.tp.rank_facts.RankFacts`, which rank 0 serves in ``get_server_info``)
through the rendezvous store, joins the process group and then runs every batch rank 0 broadcasts until
STOP. It never schedules, samples or caches: its ``req_to_token`` rows are copied from rank 0
with each batch. Any error ends the process (rank 0's next collective then fails), since a rank
that skipped a forward could only desynchronise the group's collectives.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import traceback
from datetime import timedelta
from typing import Any

import torch

log = logging.getLogger("plait.tp.worker")


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``); exit now if the
    parent is already gone (it may have died before the call)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)


def build_runner(cfg: dict[str, Any]) -> Any:
    """This rank's runner (the same factories as rank 0's, on this rank's shard). The backend
    and the model's loader come from the composition root, as rank 0's did."""
    from pathlib import Path

    from plait import compose
    from plait.core.backend_api import ModelSpec
    from plait.core.memory import ReqToTokenPool
    from plait.core.model_runner import build_model_runner
    from plait.core.pp.pipeline import StageRunner
    from plait.core.pp.stage import PPStage
    from plait.core.tp.group import TPGroup

    backend = compose.get_backend(cfg["device"], cfg.get("backend_options"))
    backend.bind_tp_rank(cfg["rank"])
    model_dir = Path(cfg["model_dir"])
    hf = compose.load_config(model_dir)
    # A pipeline rank (pp_size > 1) holds whole layers; a tensor-parallel rank a shard of each.
    pipeline = cfg.get("pp_size", 1) > 1
    rank = {"rank": cfg["rank"], "size": cfg["size"]}
    spec = ModelSpec(
        model_dir=model_dir,
        hf_config=hf,
        dtype=getattr(torch, cfg["dtype"]),
        context_len=cfg["context_len"],
        max_batch_size=cfg["max_batch_size"],
        graph_capture=cfg["graph_capture"],
        tp=TPGroup() if pipeline else TPGroup(**rank),
        pp=PPStage(**rank, num_layers=hf.num_hidden_layers) if pipeline else PPStage(),
        load_model=compose.model_loader(hf),
    )
    req_pool = ReqToTokenPool(cfg["max_batch_size"], cfg["context_len"] + 1, backend.torch_device)
    runner, _ = build_model_runner(backend, spec, cfg["num_slots"], cfg["page_size"], req_pool)
    return StageRunner(runner, spec.pp) if pipeline else runner


def facts_json(runner: Any) -> str:
    """What this rank reports with its ready signal: its pipeline stage or its shard."""
    from plait.core.pp.pipeline import StageRunner, stage_facts
    from plait.core.tp.rank_facts import facts_of

    if isinstance(runner, StageRunner):
        return stage_facts(runner.local, runner.stage).to_json()
    return facts_of(runner).to_json()


def start_kv_agent(runner: Any, kv_transfer: dict[str, Any] | None, store: Any, rank: int) -> Any:
    """Under prefill/decode disaggregation, this rank's own KV transfer (its shard's KV is
    here, out of rank 0's reach), its facts published to rank 0 as ``kv``; None otherwise."""
    if not kv_transfer:
        return None
    from plait.core.tp.launcher import _KEY_PUBLISHED
    from plait.disaggregation.rank_agent import RankAgent

    agent = RankAgent(runner.kv_pool, **kv_transfer)
    store.set(_KEY_PUBLISHED.format("kv", rank), json.dumps(agent.facts()))
    return agent


def serve(runner: Any) -> None:
    from plait.core.tp.batch_channel import recv_batch

    while (batch := recv_batch(runner.req_pool.req_to_token)) is not None:
        runner.run(batch)


def main() -> int:
    cfg = json.loads(sys.argv[1])
    rank = cfg["rank"]
    die_with_parent(cfg["parent_pid"])
    logging.basicConfig(level=logging.WARNING, format=f"[tp rank {rank}] %(message)s")
    if cfg.get("cores"):
        os.sched_setaffinity(0, cfg["cores"])
        torch.set_num_threads(len(cfg["cores"]))
    import torch.distributed as dist
    from plait.core.tp.launcher import COLLECTIVE_TIMEOUT, HOST, _KEY_ERROR, _KEY_READY

    store = dist.TCPStore(
        HOST, cfg["port"], cfg["size"], is_master=False, timeout=timedelta(seconds=60)
    )
    try:
        runner = build_runner(cfg)
        facts = facts_json(runner)
        agent = start_kv_agent(runner, cfg.get("kv_transfer"), store, rank)  # kept alive
    except BaseException:  # noqa: BLE001 - reported to rank 0, which raises it
        store.set(_KEY_ERROR.format(rank), traceback.format_exc())
        return 1
    store.set(_KEY_READY.format(rank), facts)
    dist.init_process_group(
        cfg["dist_backend"],
        store=store,
        rank=rank,
        world_size=cfg["size"],
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        serve(runner)
    except BaseException:  # noqa: BLE001
        log.exception("forward failed; leaving the group")
        return 1
    del agent  # it served transfers until STOP
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
