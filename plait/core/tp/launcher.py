"""Start and stop the worker ranks (1..N-1) of a tensor-parallel engine; rank 0 is the caller.

Start-up, in order:
1. Rank 0 opens the rendezvous ``TCPStore`` on 127.0.0.1, port 0 (the OS picks a free one, so
   two engines never race for a port), then spawns ``python -m plait.core.tp.worker`` once per
   rank from a dedicated thread that stays alive, reaping them, until they exit.
2. Every rank loads its own shard. A worker writes ``ready/<rank>`` (its
   :class:`~plait.core.tp.rank_facts.RankFacts` as JSON), or ``error/<rank>`` with its
   traceback, into the store; rank 0 polls those keys and the processes, and a worker that
   fails or dies fails the start with its error (the other workers are killed).
3. All ranks join the default ``torch.distributed`` group with the device backend's
   ``distributed_backend`` (gloo on the CPU) over that store.

Lifetime: a worker sets ``PR_SET_PDEATHSIG`` (SIGKILL) for itself, so it dies with rank 0 even
when rank 0 is killed; the signal fires when the *thread* that spawned it ends, hence the
dedicated spawner thread. :meth:`WorkerRanks.stop` broadcasts STOP, waits, kills stragglers and
destroys the process group and the store, which releases every port.

CPU ranks get their own cores: the process's allowed cores are split into contiguous runs, one
per rank; a worker pins itself to its run and every rank sets ``torch.set_num_threads`` to its
run's length (rank 0 is not pinned, since it shares its process with the caller, and gets its
thread count back at stop).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from plait.core.tp.rank_facts import RankFacts
from plait.core.tp.sharding import split_range

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# Workers wait in a broadcast while the engine is idle; an idle engine must not time them out.
COLLECTIVE_TIMEOUT = timedelta(days=365)
_KEY_READY, _KEY_ERROR = "plait/tp/ready/{}", "plait/tp/error/{}"
_KEY_PUBLISHED = "plait/tp/published/{}/{}"  # name, rank


def cores_of_rank(rank: int, size: int) -> list[int]:
    """Rank's share of this process's allowed cores (every rank gets at least one; with fewer
    cores than ranks, ranks share)."""
    cores = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )
    if len(cores) < size:
        return [cores[rank % len(cores)]]
    start, stop = split_range(len(cores), size, rank)
    return cores[start:stop]


class WorkerRanks:
    """Ranks 1..size-1 of one engine: their processes, the rendezvous store and (once
    :meth:`join` returned) the default process group, which this object owns until
    :meth:`stop`."""

    def __init__(
        self,
        size: int,
        dist_backend: str,
        worker_config: dict[str, Any],
        cpu_threads: bool,
        parse_facts: Callable[[bytes], Any] = RankFacts.from_json,
    ):
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError(
                "a torch.distributed process group already exists in this "
                "process: one tensor-parallel engine per process"
            )
        self.size = size
        self.dist_backend = dist_backend
        self.store = dist.TCPStore(
            HOST, 0, size, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
        )
        self.port = self.store.port
        self.procs: list[subprocess.Popen] = []
        #: ranks 1..size-1's shards, in rank order, once :meth:`wait_ready` returned
        self.facts: list[Any] = []  # RankFacts, or a pipeline's StageFacts (parse_facts)
        self._parse_facts = parse_facts
        self._joined = False
        self._saved_threads = torch.get_num_threads()
        if cpu_threads:
            torch.set_num_threads(len(cores_of_rank(0, size)))
        configs = [
            {
                **worker_config,
                "rank": r,
                "size": size,
                "port": self.port,
                "parent_pid": os.getpid(),
                "dist_backend": dist_backend,
                "cores": cores_of_rank(r, size) if cpu_threads else None,
            }
            for r in range(1, size)
        ]
        spawned = threading.Event()
        self._spawner = threading.Thread(
            target=self._spawn_and_reap,
            args=(configs, spawned),
            name="plait-tp-spawner",
            daemon=True,
        )
        self._spawner.start()
        spawned.wait()
        if len(self.procs) != len(configs):
            self.stop()
            raise RuntimeError("could not start the tensor-parallel worker processes")

    def _spawn_and_reap(self, configs: list[dict[str, Any]], spawned: threading.Event) -> None:
        root = str(Path(__file__).resolve().parents[3])  # the directory holding plait/
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
        }
        try:
            for cfg in configs:
                if cfg["cores"]:
                    env["OMP_NUM_THREADS"] = str(len(cfg["cores"]))
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "plait.core.tp.worker", json.dumps(cfg)], env=env
                    )
                )
        except OSError:
            log.exception("spawning a tensor-parallel worker failed")
        finally:
            spawned.set()
        for proc in list(self.procs):  # keep this thread (the workers' parent) alive
            proc.wait()

    def wait_ready(self, timeout: float) -> None:
        """Until every worker loaded its shard (then :attr:`facts` holds what each reported);
        raises RuntimeError with a worker's error
        (after stopping the others) when one fails, dies or times out."""
        pending = set(range(1, self.size))
        deadline = time.monotonic() + timeout
        while pending:
            for rank in sorted(pending):
                error = self._error_of(rank)
                if error is not None:
                    self.stop()
                    raise RuntimeError(f"tensor-parallel rank {rank} failed to start:\n{error}")
                if self.store.check([_KEY_READY.format(rank)]):
                    pending.discard(rank)
            if pending and time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"tensor-parallel ranks {sorted(pending)} did not load "
                    f"their shards within {timeout:.0f} s"
                )
            time.sleep(0.05)
        self.facts = [
            self._parse_facts(self.store.get(_KEY_READY.format(r))) for r in range(1, self.size)
        ]

    def published(self, name: str) -> list[bytes]:
        """What each worker rank published under ``name`` (``worker.publish``) before its
        ready signal, in rank order; only after :meth:`wait_ready`."""
        return [self.store.get(_KEY_PUBLISHED.format(name, r)) for r in range(1, self.size)]

    def _error_of(self, rank: int) -> str | None:
        if self.store.check([_KEY_ERROR.format(rank)]):
            return self.store.get(_KEY_ERROR.format(rank)).decode(errors="replace")
        code = self.procs[rank - 1].poll()
        if code is not None and not self.store.check([_KEY_ERROR.format(rank)]):
            return f"the process exited with code {code} before it was ready"
        return None

    def join(self) -> None:
        import torch.distributed as dist

        dist.init_process_group(
            self.dist_backend,
            store=self.store,
            rank=0,
            world_size=self.size,
            timeout=COLLECTIVE_TIMEOUT,
        )
        self._joined = True

    def dead_ranks(self) -> list[int]:
        return [r for r, p in enumerate(self.procs, start=1) if p.poll() is not None]

    def stop(self, send_stop: Any = None, timeout: float = 10.0) -> None:
        """Stop every worker: ``send_stop()`` (the STOP broadcast) when the group is healthy,
        then wait, then kill; release the process group, the store and the spawner thread."""
        import torch.distributed as dist

        graceful = self._joined and send_stop is not None and not self.dead_ranks()
        if graceful:
            try:
                send_stop()
            except Exception:  # noqa: BLE001 - a broken group: the workers get killed below
                log.exception("tensor-parallel STOP broadcast failed")
                graceful = False
        deadline = time.monotonic() + (timeout if graceful else 0.0)
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._joined:
            dist.destroy_process_group()
            self._joined = False
        self._spawner.join(timeout=timeout)
        self.store = None  # type: ignore[assignment]  # closes the rendezvous port
        torch.set_num_threads(self._saved_threads)
