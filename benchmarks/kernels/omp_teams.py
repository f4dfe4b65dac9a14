"""Why the engine keeps one OpenMP team (``plait/backends/cpu/threads.py``): the same kernels on
a worker thread, with and without a second thread that owns a libgomp team.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.kernels.omp_teams   # ~1 min

Each case runs in a fresh process (a team, once started, lives as long as its thread). The
worker thread times ``--calls`` calls of two products of SmolLM2-135M's gate/up shape
(3072 x 576 at M = 1): the VNNI quantized kernel on Q4_1-style weights where the CPU has it,
and oneDNN float32 on prepacked weights. Cases:

- ``no other team``: the main thread never starts a parallel region (what the engine does);
- ``main thread owns a team``: the main thread ran a parallel torch op first (what the engine
  did before, by loading the model on the caller's thread);
- ``main thread, one thread``: as the first, the main thread's parallel op run under
  ``one_thread_here`` (the fix).

Columns: median us per call, and the worker's context switches per call (``getrusage``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the children run as modules from here
CASES = {
    "no other team": "none",
    "main thread owns a team": "team",
    "main thread, one thread": "one",
}


def child(mode: str, calls: int) -> dict[str, float]:
    import torch

    from plait.backends.cpu.cpp_build import has_avx512_vnni
    from plait.backends.cpu.threads import one_thread_here
    from plait.quant.formats import quantize_int4

    def main_work() -> None:
        a = torch.randn(2_000_000)
        for _ in range(5):
            a.exp()

    if mode == "team":
        main_work()
    elif mode == "one":
        with one_thread_here():
            main_work()
    out: dict[str, float] = {}

    def worker() -> None:
        w = torch.randn(3072, 576)
        x = torch.randn(1, 576)
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        products = {
            "oneDNN fp32": (
                lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            )
        }
        if has_avx512_vnni():
            from plait.backends.cpu.qmatmul import extension

            q = quantize_int4(w, 32)
            kernel = extension().qmatmul_q8
            products["VNNI Q4_1"] = lambda: kernel(x, q.qs, q.scales, q.mins, 4, 32)
        for name, fn in products.items():
            for _ in range(200):
                fn()
            switches = resource.getrusage(resource.RUSAGE_THREAD)
            times = []
            for _ in range(calls):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            after = resource.getrusage(resource.RUSAGE_THREAD)
            n = (after.ru_nvcsw + after.ru_nivcsw) - (switches.ru_nvcsw + switches.ru_nivcsw)
            out[f"{name} us"] = statistics.median(times) * 1e6
            out[f"{name} switches/call"] = n / calls

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--child", choices=sorted(set(CASES.values())))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.calls)))
        return
    rows = {}
    for label, mode in CASES.items():
        done = subprocess.run(
            [sys.executable, "-m", __spec__.name, "--child", mode, "--calls", str(args.calls)],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        rows[label] = json.loads(done.stdout.strip().splitlines()[-1])
    cols = list(next(iter(rows.values())))
    print("| case | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for label, r in rows.items():
        print(
            f"| {label} | "
            + " | ".join(f"{r[c]:.1f}" if "us" in c else f"{r[c]:.2f}" for c in cols)
            + " |"
        )


if __name__ == "__main__":
    main()
