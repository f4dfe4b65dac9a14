"""Where a decode step's time goes: torch.profiler on the engine's scheduler thread.

    .venv/bin/python -m benchmarks.profile_decode --batch 1 16 --steps 32
    .venv/bin/python -m benchmarks.profile_decode --split --batch 1 16 64   # no profiler

Prompts are 32 random tokens and EOS is ignored; the profile covers the whole generate call
(one prefill step, then ``--steps`` decode steps) and prints the top operators by self CPU
time, plus the share of the step spent outside ``aten::mm``/``aten::addmm`` (the matrix
products) and outside the model's forward (sampling, batch construction, detokenization).

``--split`` runs without the profiler and prints where a decode step's wall time goes, from the
scheduler's own phase counters (``SchedulerStats``): the model's forward, sampling (logits
processing included), scheduling (batch construction, admission) and processing (appending
tokens, finishing, outputs), and the rest (the caller's thread: detokenization, result
assembly). The engine runs without the overlap schedule for it, so the phases add up to the
step instead of overlapping.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

import plait


def profile_batch(engine: plait.Engine, batch: int, steps: int, rows: int) -> None:
    rng = random.Random(batch)
    ids = [[rng.randrange(100, 40000) for _ in range(32)] for _ in range(batch)]
    sp = {"max_new_tokens": steps, "temperature": 0, "ignore_eos": True}
    engine.generate(input_ids=ids, sampling_params=dict(sp, max_new_tokens=4))  # warm-up
    engine.flush_cache()
    prof = profile(activities=[ProfilerActivity.CPU])
    # The profiler's state is per thread: start and stop it on the scheduler thread.
    engine._call(prof.__enter__)
    engine.generate(input_ids=ids, sampling_params=sp)
    engine._call(lambda: prof.__exit__(None, None, None))
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(
        e.self_cpu_time_total
        for e in events
        if e.key
        in (
            "aten::mm",
            "aten::addmm",
            "mkldnn::_linear_pointwise",
            "aten::mkldnn_linear",
            "mkl::_mkl_linear",
            "plait::panel_linear",
        )
    )
    print(
        f"\n=== batch {batch}: {steps} decode steps, {total / 1e3 / steps:.1f} ms/step "
        f"(profiled), matrix products {100 * mm / max(total, 1):.0f}% ==="
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))


PHASES = ("forward", "sample", "schedule", "process")


def split_batch(engine: plait.Engine, batch: int, steps: int) -> None:
    """Median-free but repeatable: the counters of one call of ``steps`` decode steps after a
    warm-up, divided by the steps (the prefill step is excluded: its counters are taken
    before the decode steps start, from a 1-token call on the same prompts)."""
    rng = random.Random(batch)
    ids = [[rng.randrange(100, 40000) for _ in range(32)] for _ in range(batch)]
    sp = {"temperature": 0, "ignore_eos": True}
    stats = engine.scheduler.stats
    engine.generate(input_ids=ids, sampling_params=dict(sp, max_new_tokens=4))  # warm-up

    def counters() -> dict[str, float]:
        return {p: getattr(stats, f"{p}_seconds") for p in PHASES}

    def timed(new: int) -> tuple[float, dict[str, float]]:
        engine.flush_cache()
        before = counters()
        t = time.perf_counter()
        engine.generate(input_ids=ids, sampling_params=dict(sp, max_new_tokens=new))
        wall = time.perf_counter() - t
        return wall, {p: v - before[p] for p, v in counters().items()}

    wall1, c1 = timed(1)  # prefill (+ first token) only
    wall, c = timed(steps + 1)
    per = {p: (c[p] - c1[p]) / steps * 1e3 for p in PHASES}
    step_ms = (wall - wall1) / steps * 1e3
    rest = step_ms - sum(per.values())
    print(
        f"| {batch} | {step_ms:.1f} | {batch / step_ms * 1e3:.0f} | "
        + " | ".join(f"{per[p]:.2f} ({100 * per[p] / step_ms:.0f}%)" for p in PHASES)
        + f" | {rest:.2f} ({100 * rest / step_ms:.0f}%) |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument(
        "--split", action="store_true", help="no profiler: the step's wall time by scheduler phase"
    )
    ap.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra plait.Engine keyword (value parsed as Python literal)",
    )
    args = ap.parse_args()
    import ast

    kwargs = {}
    for item in args.engine_arg:
        key, _, value = item.partition("=")
        kwargs[key] = ast.literal_eval(value)
    # the profiler records the thread it is started on (the scheduler's): without the overlap
    # schedule the forward runs there too, instead of on the overlap worker
    kwargs["disable_overlap_schedule"] = True
    with plait.Engine(**kwargs) as engine:
        print(f"threads={torch.get_num_threads()} engine args={kwargs}")
        if args.split:
            print(
                "| batch | step ms | tok/s | "
                + " | ".join(f"{p} ms" for p in PHASES)
                + " | rest ms |\n|---"
                + "|---" * (len(PHASES) + 3)
                + "|"
            )
        for b in args.batch:
            if args.split:
                split_batch(engine, b, args.steps)
            else:
                profile_batch(engine, b, args.steps, args.rows)


if __name__ == "__main__":
    main()
