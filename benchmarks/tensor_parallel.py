"""Decode tok/s with tensor parallelism on the CPU: tp 1 with 2 threads vs tp 2 with 1 thread
per rank, at batch 1 and 16 (SmolLM2-135M-Instruct, float32).

    .venv/bin/python benchmarks/tensor_parallel.py [--rounds 3] [--new 64]

Both engines stay up for the whole run and the measurements alternate (tp1, tp2, tp1, ...),
so the load other processes put on the machine hits both alike; the table shows medians.
Decode rate = batch * (new - 1) / (time for ``new`` tokens - time for 1 token): prefill is
subtracted out. The tp 2 measurements run with rank 0's share of the cores as this process's
torch threads (1 on 2 cores), the tp 1 measurements with all of them. A second table shows
what each rank of both engines holds, as the ranks report it (``get_server_info()
["tp_ranks"]``), so the run shows that tp 2 really shards.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

import plait
from plait.core.tp.launcher import cores_of_rank


def decode_rate(engine: plait.Engine, batch: int, new: int) -> float:
    rng = random.Random(0)
    ids = [[rng.randrange(100, 40000) for _ in range(8)] for _ in range(batch)]

    def seconds(n: int) -> float:
        sp = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
        t = time.perf_counter()
        engine.generate(input_ids=ids, sampling_params=sp)
        return time.perf_counter() - t

    engine.flush_cache()
    one = seconds(1)
    engine.flush_cache()
    return batch * (new - 1) / (seconds(new) - one)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new", type=int, default=64)
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    common = dict(disable_radix_cache=True, max_total_tokens=8192)
    tp1 = plait.Engine(tp_size=1, **common)
    tp2 = plait.Engine(tp_size=2, **common)
    # Rank 0's share of the cores (the engine's start-up runs under the backend's host_thread,
    # which gives the caller its thread count back, so it cannot be read off torch here).
    rank0_threads = len(cores_of_rank(0, 2))
    results: dict[tuple[int, int], list[float]] = {}
    shards = {tp: e.get_server_info()["tp_ranks"] for tp, e in ((1, tp1), (2, tp2))}
    try:
        for _ in range(args.rounds):
            for batch in (1, 16):
                for tp, engine, threads in ((1, tp1, cores), (2, tp2, rank0_threads)):
                    torch.set_num_threads(threads)
                    results.setdefault((tp, batch), []).append(
                        decode_rate(engine, batch, args.new))
    finally:
        tp2.shutdown()
        tp1.shutdown()
    print(f"cores={cores} rounds={args.rounds} new_tokens={args.new}")
    print("| batch | tp 1 (%d threads) tok/s | tp 2 (%d thread/rank) tok/s | tp2 / tp1 |"
          % (cores, rank0_threads))
    print("|---|---|---|---|")
    for batch in (1, 16):
        a, b = (statistics.median(results[(tp, batch)]) for tp in (1, 2))
        print(f"| {batch} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    print("\nWhat each rank holds (get_server_info()['tp_ranks']):")
    print("| engine | rank | query heads | KV heads | MLP rows | vocab rows | weights MiB | "
          "decode captured |")
    print("|---|---|---|---|---|---|---|---|")
    for tp, ranks in shards.items():
        for r in ranks:
            print(f"| tp {tp} | {r['rank']} | {r['attention_heads']} | {r['kv_heads']} | "
                  f"{r['mlp_rows']} | {r['vocab_rows']} | {r['weight_bytes'] / 2**20:.0f} | "
                  f"{r['decode_captured']} |")


if __name__ == "__main__":
    main()
