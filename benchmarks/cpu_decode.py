"""CPU decode: the old path (nn.Linear on MKL, eager) vs the new one (oneDNN-prepacked
weights, eager by default) in one process, runs interleaved A/B so a noisy machine hits both.

    .venv/bin/python benchmarks/cpu_decode.py                  # old vs prepacked
    .venv/bin/python benchmarks/cpu_decode.py --compiled       # + prepacked with torch.compile
    .venv/bin/python benchmarks/cpu_decode.py --attention      # torch gather vs paged kernel
    .venv/bin/python benchmarks/cpu_decode.py --quick          # fewer tokens, 1 repeat

Without ``--attention`` every path uses the torch (gather) decode attention, so the Linear
layers are the only difference; with it, both paths are prepacked and only the decode
attention differs (``plait.backends.cpu.paged_decode``).

Workloads (random prompt ids, greedy, EOS ignored): decode at batch 1/16/64 (32-token
prompts, 64 new tokens each; tok/s over the whole call), 64 mixed requests (32-256 prompt,
16-96 new tokens; output tok/s) and 32 requests sharing a 1,000-token prefix (16 new tokens
each; req/s). Each cell is the median of ``--repeats`` runs; the paths alternate run by run.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Callable

import torch

import plait
from plait.backends.cpu.plugin import CpuBackend


def requests(n: int, prompt: tuple[int, int], new: tuple[int, int], seed: int,
             prefix: list[int] | None = None) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [((prefix or []) + [rng.randrange(100, 40000) for _ in range(rng.randint(*prompt))],
             rng.randint(*new)) for _ in range(n)]


def serve(engine: plait.Engine, reqs: list[tuple[list[int], int]]) -> float:
    """Seconds to serve all requests submitted at once, from an empty prefix cache."""
    engine.flush_cache()
    sps = [{"max_new_tokens": m, "temperature": 0, "ignore_eos": True} for _, m in reqs]
    t = time.perf_counter()
    engine.generate(input_ids=[p for p, _ in reqs], sampling_params=sps)
    return time.perf_counter() - t


def make_engine(prepack: bool, compiled: bool, paged: bool = False) -> plait.Engine:
    CpuBackend.prepack_weights, CpuBackend.paged_decode_kernel = prepack, paged
    try:
        return plait.Engine(kv_cache_memory_gb=0.5, enable_graph_capture=compiled)
    finally:
        CpuBackend.prepack_weights, CpuBackend.paged_decode_kernel = True, True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compiled", action="store_true",
                    help="add the torch.compile path (compiles for minutes at start)")
    ap.add_argument("--attention", action="store_true",
                    help="compare the decode attention instead: torch gather vs paged kernel")
    args = ap.parse_args()
    new = 16 if args.quick else 64
    repeats = 1 if args.quick else args.repeats

    if args.attention:
        paths = {"torch gather attention": make_engine(True, False, paged=False),
                 "paged kernel": make_engine(True, False, paged=True)}
    else:
        paths = {"old (MKL, eager)": make_engine(False, False),
                 "prepacked (eager)": make_engine(True, False)}
    if args.compiled:
        t = time.perf_counter()
        paths["prepacked + compile"] = make_engine(True, True)
        print(f"compile warm-up: {time.perf_counter() - t:.0f} s")

    prefix = requests(1, (1000, 1000), (0, 0), seed=99)[0][0]
    workloads: list[tuple[str, list, Callable[[list, float], float]]] = []
    for bs in (1, 16, 64):
        workloads.append((f"decode batch {bs}, tok/s", requests(bs, (32, 32), (new, new), bs),
                          lambda r, s: sum(m for _, m in r) / s))
    workloads.append(("64 mixed, output tok/s", requests(64, (32, 256), (16, new + 32), 5),
                      lambda r, s: sum(m for _, m in r) / s))
    workloads.append(("32 x shared 1000-token prefix, req/s",
                      requests(32, (32, 32), (16, 16), 7, prefix), lambda r, s: len(r) / s))

    for engine in paths.values():  # warm-up: first-call allocations, lazy oneDNN setup
        serve(engine, requests(2, (8, 8), (4, 4), 0))
    names = list(paths)
    print(f"\nSmolLM2-135M-Instruct fp32, {torch.get_num_threads()} threads, "
          f"median of {repeats} interleaved runs\n")
    print("| workload | " + " | ".join(names) + " | " +
          " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(names) - 1))
    for title, reqs, rate in workloads:
        runs: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(repeats):
            for name, engine in paths.items():
                runs[name].append(rate(reqs, serve(engine, reqs)))
        med = {n: statistics.median(v) for n, v in runs.items()}
        base = med[names[0]]
        print(f"| {title} | " + " | ".join(f"{med[n]:.1f}" for n in names) + " | " +
              " | ".join(f"{med[n] / base:.2f}x" for n in names[1:]) + " |", flush=True)
    if args.compiled:
        print("\ncompiled path:", {k: v for k, v in paths["prepacked + compile"]
                                   .get_server_info().items() if "graph" in k or "captured" in k})
    for engine in paths.values():
        engine.shutdown()


if __name__ == "__main__":
    main()
