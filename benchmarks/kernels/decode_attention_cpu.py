"""The CPU decode attention kernel (``plait/backends/cpu/decode_attention_kernel.h``) alone, on
SmolLM2-135M's heads (9 query heads, 3 KV heads, head size 64), 30 layers per step.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.kernels.decode_attention_cpu  # ~1 min

Each layer has its own K/V pool of ``--pool`` slots, so a step reads its KV from memory as the
model's does. Requests' slots are consecutive (``contiguous``: a fresh server) or a random
permutation of the pool (``scattered``: a long-running one whose free list is shuffled).
A case ``BATCHxPREFIX+TAIL`` gives every request the same first PREFIX slots (a prefix from the
radix cache, which the kernel reads once for the whole group) and TAIL slots of its own.
Columns: median ms per 30-layer step over ``--iters`` steps, the distinct KV bytes a step
reads, and that divided by the time. The machine's memory bandwidth (~25 GB/s on the 2-core development
machine) bounds the last column.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from plait.backends.cpu import cpp_build

HQ, HKV, D, LAYERS = 9, 3, 64, 30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--cases",
        nargs="+",
        default=["1x330", "1x1000", "16x330", "32x1000", "32x1000+33"],
        help="BATCHxLENGTH: requests per step and KV tokens per request; "
        "BATCHxPREFIX+TAIL: a shared prefix and a tail of each one's own",
    )
    ap.add_argument("--pool", type=int, default=40_000, help="KV slots per layer")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    ext = cpp_build.extension().decode_attention
    gen = torch.Generator().manual_seed(0)
    ks = [torch.randn(args.pool, HKV, D, generator=gen) for _ in range(LAYERS)]
    vs = [torch.randn(args.pool, HKV, D, generator=gen) for _ in range(LAYERS)]
    print(f"threads: {torch.get_num_threads()}, median of {args.iters} steps\n")
    print("| slots | batch | tokens each | ms / step | KV MB / step | GB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for layout in ("contiguous", "scattered"):
        for case in args.cases:
            batch, length = case.split("x")
            batch = int(batch)
            prefix, tail = (
                (int(v) for v in length.split("+")) if "+" in length else (0, int(length))
            )
            n, distinct = prefix + tail, prefix + batch * tail
            if distinct > args.pool:
                raise SystemExit(f"{case} needs more than --pool {args.pool} slots")
            q = torch.randn(batch, HQ, D, generator=gen)
            order = (
                torch.arange(args.pool)
                if layout == "contiguous"
                else torch.randperm(args.pool, generator=gen)
            )
            own = order[prefix:distinct].reshape(batch, tail)
            slots = torch.cat([order[:prefix].expand(batch, prefix), own], 1).contiguous()
            lens = torch.full((batch,), n, dtype=torch.int64)

            def step(q=q, slots=slots, lens=lens) -> None:
                for layer in range(LAYERS):
                    ext.decode_attention(q, ks[layer], vs[layer], slots, lens, D**-0.5)

            step()
            times = []
            for _ in range(args.iters):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            ms = statistics.median(times) * 1e3
            mb = distinct * HKV * D * 4 * 2 * LAYERS / 1e6
            print(
                f"| {layout} | {batch} | {case.split('x')[1]} | {ms:.2f} | {mb:.1f} | "
                f"{mb / ms:.1f} |"
            )


if __name__ == "__main__":
    main()
