"""The panel GEMM's cost against its row count: one SmolLM2-135M forward's products at M = 1..40
rows, this checkout's kernel against a baseline checkout's, alternating.

    OMP_NUM_THREADS=1 python -m benchmarks.kernels.panel_rows_cpu \\
        --baseline /tmp/main-snapshot [--baseline-kernel-dir DIR]          # ~2 min

Why: a speculative verify pass at batch 16 multiplies 17-40 rows where a decode step
multiplies 16, so what each extra row costs (and whether 17 rows cost a step over 16) decides
what verifying a guess costs (docs/speculative.md).

Each build runs in its own worker process (the kernel module is the checkout's
``plait.backends.cpu``, from its ``$PLAIT_KERNEL_DIR``), holding the model's products in model
order (30 layers of qkv 960x576, o 576x576, gate/up 3072x576, down 576x1536, then the
49152x576 LM head) as real-sized random weights in one form: ``bf16`` (the 16-bit panels
SmolLM2's bfloat16 checkpoint gets) or ``float32`` panels. The parent asks the workers in turn
for one pass at each M (a noisy neighbour hits both), and a cell is the median of
``--repeats`` passes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# (N, K) of one layer's products, in the order a forward runs them, and the LM head's
LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LM_HEAD = (49152, 576)
REPO = Path(__file__).resolve().parents[2]


def worker(form: str, layers: int) -> None:
    """Hold the products' weights in `form`, then answer each M read from stdin with the CPU
    seconds one pass of every product at M rows took (CPU time, not wall time: a machine
    shared with other jobs stretches the wall time far more)."""
    import torch

    from plait.backends.cpu.linear import panel_extension

    panel = panel_extension()
    if panel is None:
        raise SystemExit("the panel kernel needs a CPU with AVX-512 (VNNI level) and a compiler")
    gen = torch.Generator().manual_seed(0)
    products = []
    for n, k in [*LAYER * layers, LM_HEAD]:
        w = (torch.randn(n, k, generator=gen) * 0.02).bfloat16().float()
        packed = panel.pack(w)
        if form == "bf16":
            (halves,) = panel.encode_bf16(packed)
            products.append((k, lambda x, h=halves, n=n: panel.linear_bf16(x, h, n, None)))
        else:
            products.append((k, lambda x, p=packed, n=n: panel.linear(x, p, n)))
    print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        m = int(line)
        xs = {k: torch.randn(m, k, generator=gen) for k in (576, 1536)}
        start = time.process_time()
        for k, fn in products:
            fn(xs[k])
        print(json.dumps(time.process_time() - start), flush=True)


def start_worker(checkout: Path, kernel_dir: str | None, form: str, layers: int):
    env = dict(os.environ, PYTHONPATH=str(checkout))
    if kernel_dir is not None:
        env["PLAIT_KERNEL_DIR"] = kernel_dir
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", form, "--layers", str(layers)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    threads = json.loads(proc.stdout.readline())["threads"]  # type: ignore[union-attr]
    return proc, threads


def ask(proc: subprocess.Popen, m: int) -> float:
    proc.stdin.write(f"{m}\n")  # type: ignore[union-attr]
    proc.stdin.flush()  # type: ignore[union-attr]
    return float(json.loads(proc.stdout.readline()))  # type: ignore[union-attr]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, help="a checkout to compare with (required)")
    ap.add_argument("--baseline-kernel-dir", help="its $PLAIT_KERNEL_DIR (default: inherited)")
    ap.add_argument("--rows", type=int, nargs="+", default=list(range(1, 41)))
    ap.add_argument("--forms", nargs="+", choices=["bf16", "float32"], default=["bf16"])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", choices=["bf16", "float32"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.layers)
    if args.baseline is None:
        ap.error("--baseline is required")
    for form in args.forms:
        builds = {
            "baseline": start_worker(args.baseline, args.baseline_kernel_dir, form, args.layers),
            "this": start_worker(REPO, os.environ.get("PLAIT_KERNEL_DIR"), form, args.layers),
        }
        try:
            for proc, _ in builds.values():
                ask(proc, 8)  # warm-up
            times: dict[str, dict[int, list[float]]] = {b: {} for b in builds}
            for _ in range(args.repeats):
                for m in args.rows:
                    for name, (proc, _) in builds.items():
                        times[name].setdefault(m, []).append(ask(proc, m))
        finally:
            for proc, _ in builds.values():
                proc.stdin.close()  # type: ignore[union-attr]
                proc.wait()
        threads = builds["this"][1]
        print(f"\n{form} panels, {args.layers} layers + LM head, {threads} thread(s), CPU ms/pass")
        print("| M | baseline | this | this / baseline |")
        print("|---|---:|---:|---:|")
        for m in args.rows:
            a, b = (statistics.median(times[name][m]) for name in ("baseline", "this"))
            print(f"| {m} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
