"""What the memory system allows a float32 decode step: the read bandwidth, and the 121
oneDNN products of SmolLM2-135M on weights that stream from memory, from the main thread and
from a second thread (where the engine runs its forward).

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.kernels.stream_products   # ~1 min

The weights are 30 layers of real-sized random matrices (qkv 960x576, o 576x576, gate/up
3072x576, down 576x1536; 540 MB with the 49152x576 LM head), prepacked for oneDNN as the CPU
backend does, and multiplied in model order, so each product's weight comes from DRAM (they
do not fit the last-level cache). Medians of ``--repeats`` passes; the two threads alternate
pass by pass so a noisy neighbour hits both.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from benchmarks.kernels.qmatmul_cpu import (
    SHAPES,  # SmolLM2-135M's products (N, K, calls)
)


def read_bandwidth_gbs(repeats: int) -> float:
    x = torch.randn(135_000_000)  # 540 MB, the float32 weights' size
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


def step_ms(weights: list[tuple[torch.Tensor, int]], m: int) -> float:
    xs = {k: torch.randn(m, k) for k in (576, 1536)}
    t = time.perf_counter()
    for w, k in weights:
        torch.ops.mkldnn._linear_pointwise(xs[k], w, None, "none", [], "")
    return (time.perf_counter() - t) * 1e3


def in_thread(fn, *args) -> float:
    out: list[float] = []
    th = threading.Thread(target=lambda: out.append(fn(*args)))
    th.start()
    th.join()
    return out[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    print(
        f"threads: {torch.get_num_threads()}; read bandwidth "
        f"{read_bandwidth_gbs(args.repeats):.1f} GB/s (2-thread sum of 540 MB)\n"
    )
    pack = torch.ops.mkldnn._reorder_linear_weight
    layer = [shape for name, shape in SHAPES.items() if name != "lm_head"]  # model order
    head_n, head_k, _ = SHAPES["lm_head"]
    weights = [(pack(torch.randn(n, k)), k) for _ in range(layer[0][2]) for n, k, _ in layer]
    weights.append((pack(torch.randn(head_n, head_k)), head_k))
    print("| M | main thread ms/step | second thread ms/step | second / main |")
    print("|---|---:|---:|---:|")
    for m in args.rows:
        main_ms, thread_ms = [], []
        for _ in range(args.repeats):
            main_ms.append(step_ms(weights, m))
            thread_ms.append(in_thread(step_ms, weights, m))
        a, b = statistics.median(main_ms), statistics.median(thread_ms)
        print(f"| {m} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
