"""CPU and wall of the step that finishes a whole batch at once, with the null model (issue 41).

    .venv/bin/python -m benchmarks.host_path_finish --batch 256 --rounds 7

``benchmarks/host_path.py`` subtracts a one-token call from a full one, so what every request
does once (its detokenization, KV release and output) cancels out there. This one serves
``--batch`` requests of 8 tokens each (EOS ignored: they all finish in the same step) and times
the processing call of that step (``OutputProcessor.process``) on the scheduler thread: its
thread CPU (the finishing itself) and its wall (which also holds the caller's thread taking
the GIL whenever an emitted output wakes it), and the whole call's process CPU; the least and
the median over ``--rounds``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from benchmarks.host_path import _serve, null_engine
from plait.core.output_processor import OutputProcessor

CALLS: list[tuple[float, float]] = []


def _timed_process() -> None:
    inner = OutputProcessor.process

    def process(self: OutputProcessor, *args: Any) -> None:
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            inner(self, *args)
        finally:
            CALLS.append((time.thread_time() - cpu, time.perf_counter() - wall))

    OutputProcessor.process = process  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    _timed_process()
    runs = []
    with null_engine(args.batch, 8, False) as engine:
        _serve(engine, args.batch, 4, False)  # warm-up
        for _ in range(args.rounds):
            CALLS.clear()
            _, call_cpu = _serve(engine, args.batch, 8, False)
            cpu, wall = max(CALLS)  # the finishing step's processing
            runs.append((cpu * 1e3, wall * 1e3, call_cpu * 1e3))
    print(f"null model, batch {args.batch} finishing in one step, {args.rounds} rounds (ms)")
    print("| | least | median |")
    print("|---|---:|---:|")
    for i, name in enumerate(["finishing step, scheduler thread CPU", "its wall", "call CPU"]):
        col = [r[i] for r in runs]
        print(f"| {name} | {min(col):.2f} | {statistics.median(col):.2f} |")


if __name__ == "__main__":
    main()
