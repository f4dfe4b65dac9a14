"""Where a decode step's time goes: torch.profiler on the engine's scheduler thread.

    .venv/bin/python benchmarks/profile_decode.py --batch 1 16 --steps 32

Prompts are 32 random tokens and EOS is ignored; the profile covers the whole generate call
(one prefill step, then ``--steps`` decode steps) and prints the top operators by self CPU
time, plus the share of the step spent outside ``aten::mm``/``aten::addmm`` (the matrix
products) and outside the model's forward (sampling, batch construction, detokenization).
"""
from __future__ import annotations

import argparse
import random

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
    mm = sum(e.self_cpu_time_total for e in events
             if e.key in ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise",
                          "aten::mkldnn_linear", "mkl::_mkl_linear"))
    print(f"\n=== batch {batch}: {steps} decode steps, {total / 1e3 / steps:.1f} ms/step "
          f"(profiled), matrix products {100 * mm / max(total, 1):.0f}% ===")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="extra plait.Engine keyword (value parsed as Python literal)")
    args = ap.parse_args()
    import ast
    kwargs = {}
    for item in args.engine_arg:
        key, _, value = item.partition("=")
        kwargs[key] = ast.literal_eval(value)
    with plait.Engine(**kwargs) as engine:
        print(f"threads={torch.get_num_threads()} engine args={kwargs}")
        for b in args.batch:
            profile_batch(engine, b, args.steps, args.rows)


if __name__ == "__main__":
    main()
