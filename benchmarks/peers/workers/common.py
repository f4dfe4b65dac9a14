"""The protocol between ``benchmarks/peers/peers.py`` and one engine's worker process.

A worker is run as ``PYTHON -m benchmarks.peers.workers.run_<engine> JOB.json OUT.json`` from
the repository root, with the engine's own virtualenv's PYTHON, so this module (and the packages
above it) import nothing outside the standard library.

``JOB.json`` (written by peers.py)::

    {"model_dir": str, "gguf": str | null, "threads": int, "repeats": int, "seed": int,
     "max_len": int (longest prompt + new tokens, plus slack), "options": {...per engine...},
     "warmup": [[prompt_ids, max_new_tokens], ...],
     "workloads": [{"name": str, "requests": [[prompt_ids, max_new_tokens], ...]}, ...]}

``OUT.json`` (written here)::

    {"engine": str, "version": str, "notes": str, "load_s": float,
     "seconds": {workload name: [wall seconds of each repeat]},
     "first_output": [token ids of the first request of the first workload]}

Invariants: every request is greedy and generates exactly ``max_new_tokens`` tokens (EOS
ignored); the warm-up runs once before any timing; each timed repeat serves the whole
workload from an empty prefix cache (``Serve.reset``), submitted at once for engines that batch.
Results go to a file, not stdout, because engines log to stdout.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

Request = tuple[list[int], int]  # (prompt token ids, new tokens to generate)


@dataclass
class Serve:
    """What a worker supplies: how to serve a list of requests and how to empty its caches.

    ``generate`` returns each request's generated token ids, in request order."""

    engine: str
    version: str
    generate: Callable[[list[Request]], list[list[int]]]
    reset: Callable[[], None]
    notes: str = ""


def read_job() -> dict:
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} JOB.json OUT.json")
    with open(sys.argv[1]) as f:
        return json.load(f)


def requests(raw: list) -> list[Request]:
    return [(list(p), int(n)) for p, n in raw]


def run(job: dict, serve: Serve, load_s: float, out_path: str) -> None:
    """Warm up, time every workload ``job["repeats"]`` times, write ``out_path``."""
    serve.reset()
    serve.generate(requests(job["warmup"]))
    seconds: dict[str, list[float]] = {}
    first_output: list[int] = []
    for w in job["workloads"]:
        reqs = requests(w["requests"])
        for _ in range(job["repeats"]):
            serve.reset()
            start = time.perf_counter()
            outs = serve.generate(reqs)
            seconds.setdefault(w["name"], []).append(time.perf_counter() - start)
            got = [len(o) for o in outs]
            want = [n for _, n in reqs]
            if got != want:
                raise RuntimeError(
                    f"{serve.engine}: {w['name']}: generated {got[:8]}... tokens, "
                    f"asked for {want[:8]}... (EOS must be ignored)"
                )
            if not first_output:
                first_output = list(outs[0])
        print(f"[{serve.engine}] {w['name']}: {seconds[w['name']]}", file=sys.stderr, flush=True)
    with open(out_path, "w") as f:
        json.dump(
            {
                "engine": serve.engine,
                "version": serve.version,
                "notes": serve.notes,
                "load_s": load_s,
                "seconds": seconds,
                "first_output": first_output,
            },
            f,
        )


def main(load: Callable[[dict], Serve]) -> None:
    """A worker's entry point: ``load`` builds the engine from the job (threads already set)."""
    job = read_job()
    start = time.perf_counter()
    serve = load(job)
    run(job, serve, time.perf_counter() - start, sys.argv[2])
