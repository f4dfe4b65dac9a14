"""The float32 products of one SmolLM2-135M decode step: oneDNN's packed linear against the
panel GEMM (``plait/backends/cpu/panel_gemm.h``), with the weights streamed from memory.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.kernels.panel_gemm_cpu   # ~2 min

Both hold the same 30 layers of real-sized random weights (qkv 960x576, o 576x576, gate/up
3072x576, down 576x1536) and the 49152x576 LM head, 540 MB each, so a step's weights come from
DRAM as the engine's do; each form multiplies them in model order for M rows. The two forms
alternate pass by pass (a noisy neighbour on the host hits both); a cell is the median of
``--repeats`` passes. GFLOP/s counts 2*M*N*K per product. Large M (prefill) is in the second
table, one product at a time with its weight in cache, because there the weight is read once
for many rows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.kernels.qmatmul_cpu import (
    SHAPES,  # SmolLM2-135M's products (N, K, calls)
)
from plait.backends.cpu.linear import panel_extension


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    ap.add_argument("--prefill-rows", type=int, nargs="+", default=[128, 1024, 4096])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    panel = panel_extension()
    if panel is None:
        raise SystemExit("the panel kernel needs a CPU with AVX-512 (VNNI level) and a compiler")
    onednn_pack = torch.ops.mkldnn._reorder_linear_weight

    def onednn(x, w, n):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    gen = torch.Generator().manual_seed(0)
    order = [
        (n, k)
        for _ in range(SHAPES["qkv"][2])
        for name, (n, k, _) in SHAPES.items()
        if name != "lm_head"
    ]
    order.append(SHAPES["lm_head"][:2])
    dense = [torch.randn(n, k, generator=gen) * 0.02 for n, k in order]
    forms = {
        "oneDNN": (onednn, [onednn_pack(w) for w in dense]),
        "panel": (panel.linear, [panel.pack(w) for w in dense]),
    }
    del dense
    print(f"threads: {torch.get_num_threads()}\n")
    print(
        "| M | oneDNN ms/step | panel ms/step | oneDNN / panel | oneDNN GFLOP/s | panel GFLOP/s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for m in args.rows:
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        flops = sum(2 * m * n * k for n, k in order)
        times: dict[str, list[float]] = {name: [] for name in forms}
        for _ in range(args.repeats):
            for name, (fn, weights) in forms.items():
                times[name].append(
                    timed(
                        lambda fn=fn, xs=xs, weights=weights: [
                            fn(xs[k], w, n) for (n, k), w in zip(order, weights)
                        ]
                    )
                )
        a, b = statistics.median(times["oneDNN"]), statistics.median(times["panel"])
        print(
            f"| {m} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f}x | {flops / a / 1e9:.0f} | "
            f"{flops / b / 1e9:.0f} |"
        )

    print("\n| M | product | oneDNN GFLOP/s | panel GFLOP/s |")
    print("|---|---|---:|---:|")
    for m in args.prefill_rows:
        for name, (n, k, _) in SHAPES.items():
            w = torch.randn(n, k, generator=gen) * 0.02
            x = torch.randn(m, k, generator=gen)
            cases = {"oneDNN": (onednn, onednn_pack(w)), "panel": (panel.linear, panel.pack(w))}
            best = {}
            for label, (fn, packed) in cases.items():
                fn(x, packed, n)
                best[label] = statistics.median(
                    timed(lambda fn=fn, x=x, packed=packed, n=n: fn(x, packed, n))
                    for _ in range(max(3, args.repeats // 3))
                )
            print(
                f"| {m} | {name} | {2 * m * n * k / best['oneDNN'] / 1e9:.0f} | "
                f"{2 * m * n * k / best['panel'] / 1e9:.0f} |"
            )


if __name__ == "__main__":
    main()
