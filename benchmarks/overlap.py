"""The overlap (zero-overhead) schedule vs the inline one: decode tokens/s and where a step's
time goes, at batch 1, 16 and 64, both engines in one run.

    .venv/bin/python benchmarks/overlap.py               # SmolLM2-135M on the CPU
    .venv/bin/python benchmarks/overlap.py --quick       # fewer repeats and tokens
    .venv/bin/python benchmarks/overlap.py --device cuda

Each batch submits B random 16-token prompts at once with ``ignore_eos``, so the run is almost
all decode. The two engines alternate (inline, overlap, inline, ...) ``--repeats`` times and the
table shows medians, so drift on a shared machine hits both alike. Per step (one forward pass):
``wall`` is elapsed time / passes; ``sched`` and ``proc`` are the scheduler thread's planning and
post-processing; ``fwd`` the forward and sampling; ``wait`` the scheduler blocked on a result.
Inline, wall ~= sched + fwd + proc; with overlap, sched and proc hide behind fwd, so
``exposed = wall - fwd`` (the scheduler's share of a step) should fall to near zero.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import plait

PHASES = ("schedule", "forward", "process", "wait")


def run_once(engine: plait.Engine, batch: int, new_tokens: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 40000) for _ in range(16)] for _ in range(batch)]
    sp = {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    before = engine.get_server_info()
    t = time.perf_counter()
    engine.generate(input_ids=prompts, sampling_params=sp)
    wall = time.perf_counter() - t
    after = engine.get_server_info()
    passes = after["forward_passes"] - before["forward_passes"]
    row = {"tok_s": batch * new_tokens / wall, "wall_ms": 1e3 * wall / passes}
    for p in PHASES:
        row[p] = 1e3 * (after[f"{p}_seconds"] - before[f"{p}_seconds"]) / passes
    row["exposed_ms"] = row["wall_ms"] - row["forward"]
    return row


def median_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batches", default="1,16,64")
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    new_tokens = 32 if args.quick else 64
    engines = {name: plait.Engine(device=args.device, disable_overlap_schedule=off,
                                  max_running_requests=64)
               for name, off in (("inline", True), ("overlap", False))}
    print(f"device={args.device} new_tokens={new_tokens} repeats={repeats} (medians; ms per "
          f"forward pass)")
    print(f"{'batch':>5} {'schedule':>8} {'tok/s':>8} {'wall':>7} {'sched':>7} {'fwd':>7} "
          f"{'proc':>7} {'wait':>7} {'exposed':>8} {'speedup':>7}")
    try:
        for batch in (int(b) for b in args.batches.split(",")):
            for e in engines.values():  # warm up: first forwards at this shape are slower
                run_once(e, batch, 4, seed=0)
            rows: dict[str, list] = {name: [] for name in engines}
            for r in range(repeats):
                for name, e in engines.items():
                    rows[name].append(run_once(e, batch, new_tokens, seed=r))
            med = {name: median_rows(rs) for name, rs in rows.items()}
            for name in engines:
                m = med[name]
                ratio = m["tok_s"] / med["inline"]["tok_s"]
                print(f"{batch:>5} {name:>8} {m['tok_s']:>8.1f} {m['wall_ms']:>7.2f} "
                      f"{m['schedule']:>7.2f} {m['forward']:>7.2f} {m['process']:>7.2f} "
                      f"{m['wait']:>7.2f} {m['exposed_ms']:>8.2f} {ratio:>6.2f}x")
    finally:
        for e in engines.values():
            e.shutdown()


if __name__ == "__main__":
    main()
