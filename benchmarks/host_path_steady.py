"""CPU time of a steady decode step, per thread, with the null model (issue 41).

    .venv/bin/python -m benchmarks.host_path_steady --batch 1 64 256 --steps 128

``benchmarks/host_path.py`` times whole calls (wall and process CPU), which on a shared,
loaded machine swing by 2x between runs. This one reads the thread CPU clock around each
``Scheduler.step`` (planning, batch building, processing the previous batch) and each
``BatchExecutor._run`` (placeholders, the forward, sampling) and reports, per batch size, the
median over the steps of the middle of a long decode (no prefill, no request finishing), the
minimum over ``--rounds`` runs: what one decode step costs the host while every request decodes.
Finishing (one detokenization and KV release per request) is outside it; ``host_path`` counts it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import plait
from benchmarks.host_path import null_engine
from plait.core.batch_executor import BatchExecutor
from plait.core.scheduler import Scheduler

STEP: list[float] = []
RUN: list[float] = []


def _timed(cls: type, name: str, into: list[float]) -> None:
    inner = getattr(cls, name)

    def timed(self, *args):
        start = time.thread_time()
        try:
            return inner(self, *args)
        finally:
            into.append(time.thread_time() - start)

    setattr(cls, name, timed)


def measure(engine: plait.Engine, batch: int, steps: int) -> tuple[float, float]:
    """Median scheduler-thread and worker CPU ms of the middle decode steps of one call."""
    ids = [[1000 + 17 * i + j for j in range(16)] for i in range(batch)]
    params = {"max_new_tokens": steps, "temperature": 0.0, "ignore_eos": True}
    engine.flush_cache()
    STEP.clear()
    RUN.clear()
    engine.generate(input_ids=ids, sampling_params=[params] * batch)
    mid = slice(steps // 4, steps - steps // 4)
    return statistics.median(STEP[mid]) * 1e3, statistics.median(RUN[mid]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--disable-overlap-schedule", action="store_true")
    args = ap.parse_args()
    _timed(Scheduler, "step", STEP)
    _timed(BatchExecutor, "_run", RUN)
    with null_engine(max(args.batch), args.steps, args.disable_overlap_schedule) as engine:
        measure(engine, max(args.batch), 8)  # warm-up
        runs = {b: [measure(engine, b, args.steps) for _ in range(args.rounds)] for b in args.batch}
    overlap = "off" if args.disable_overlap_schedule else "on"
    print(
        f"null model, greedy, overlap {overlap}, steady decode CPU ms (the least of {args.rounds} rounds)"
    )
    print("| batch | scheduler thread | worker | sum |")
    print("|---:|---:|---:|---:|")
    for batch in args.batch:
        s, w = min(runs[batch], key=sum)  # the round with the least total
        print(f"| {batch} | {s:.3f} | {w:.3f} | {s + w:.3f} |")


if __name__ == "__main__":
    main()
