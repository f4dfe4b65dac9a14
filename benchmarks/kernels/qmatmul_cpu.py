"""The CPU quantized matmul kernels on SmolLM2-135M's products, against oneDNN float32.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.kernels.qmatmul_cpu   # ~1 min

For M = 1 / 16 / 64 activation rows, each of the model's product shapes (fused qkv, o, fused
gate/up, down: 30 of each; the LM head once) is timed alone, median of ``--iters`` calls, with
random weights: Q4_1-style int4 (asymmetric groups of 32) for the layers, int8 per channel for
the LM head, as the GGUF file has them. Columns: ``qmatmul`` (float activations, the default),
``qmatmul_q8`` (int8 activations, ``--quantization-activations int8``; AVX-512 VNNI only) and
oneDNN float32 on prepacked weights (``plait.backends.cpu.linear``, the fp32 path). A matrix
called in a loop stays in cache, so the float32 column is a compute figure: in the model its
540 MB of weights stream from memory every step (>= 20 ms at this machine's ~27 GB/s).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from plait.backends.cpu.qmatmul import extension
from plait.quant.formats import quantize_int4, quantize_int8

# name: (N, K, calls per decode step)
SHAPES = {
    "qkv": (960, 576, 30),
    "o": (576, 576, 30),
    "gate_up": (3072, 576, 30),
    "down": (576, 1536, 30),
    "lm_head": (49152, 576, 1),
}


def median_us(fn: Callable[[], object], iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--iters", type=int, default=15)
    args = ap.parse_args()
    ext = extension()
    kernels = {"qmatmul": ext.qmatmul}
    if hasattr(ext, "qmatmul_q8"):
        kernels["qmatmul_q8"] = ext.qmatmul_q8
    print(
        f"build: {ext.simd_level()}, threads: {torch.get_num_threads()}, "
        f"median of {args.iters} calls\n"
    )
    names = list(kernels) + ["oneDNN fp32"]
    print("| M | product | " + " | ".join(f"{n} us" for n in names) + " |")
    print("|---|---|" + "---:|" * len(names))
    totals: dict[int, dict[str, float]] = {}
    for m in args.rows:
        totals[m] = dict.fromkeys(names, 0.0)
        for name, (n, k, calls) in SHAPES.items():
            w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))
            qw = quantize_int8(w) if name == "lm_head" else quantize_int4(w, 32)
            x = torch.randn(m, k)
            q_args = (x, qw.qs, qw.scales, qw.mins, qw.bits, qw.group_size)
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            us = {
                kn: median_us(lambda f=f, q_args=q_args: f(*q_args), args.iters)
                for kn, f in kernels.items()
            }
            us["oneDNN fp32"] = median_us(
                lambda x=x, packed=packed: torch.ops.mkldnn._linear_pointwise(
                    x, packed, None, "none", [], ""
                ),
                args.iters,
            )
            for kn in names:
                totals[m][kn] += us[kn] * calls
            print(f"| {m} | {name} {n}x{k} | " + " | ".join(f"{us[kn]:.0f}" for kn in names) + " |")
    print("\n| M | " + " | ".join(f"{n} ms/step" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    for m, t in totals.items():
        print(f"| {m} | " + " | ".join(f"{t[n] / 1e3:.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
