"""Where one offline batch's time goes on an accelerator: torch.profiler's kernel table,
beside the engine's own per-step phase split. (On the CPU use ``benchmarks/profile_decode.py``:
the profiler records operators only on the thread that enters it, and that script enters it on
the engine's thread; device kernels here are recorded process-wide.)

It runs ``--batch`` requests of ``--input-len`` random prompt tokens and ``--new`` greedy
tokens each, once to warm up and once under the profiler, and prints the engine's step
phases (from ``get_server_info``), the wall time, and the ``--rows`` most expensive entries
sorted by device time (CUDA) or CPU self time. Run it with ``--disable-graph-capture`` to see
every kernel: a captured graph's kernels are attributed to the replay.

    python -m tools.lease.step_profile --device cuda --dtype bfloat16 --batch 64 \\
        --disable-graph-capture
"""

from __future__ import annotations

import argparse
import random
import time

import torch

PHASES = ("schedule", "forward", "sample", "process", "wait")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-path", default=None, help="default: the bundled default model")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--disable-graph-capture", action="store_true")
    p.add_argument("--trace", default=None, help="also write a Chrome trace to this path")
    args = p.parse_args(argv)
    if args.device == "cpu":
        p.error("--device cpu: use benchmarks.profile_decode (see this docstring)")

    import plait
    from plait.models.default import default_model_path

    engine = plait.Engine(
        str(args.model_path or default_model_path()),
        device=args.device,
        dtype=args.dtype,
        max_running_requests=max(args.batch, 1),
        disable_graph_capture=args.disable_graph_capture,
    )
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, 40000) for _ in range(args.input_len)] for _ in range(args.batch)
    ]
    params = {"max_new_tokens": args.new, "temperature": 0, "ignore_eos": True}
    try:
        engine.generate(input_ids=prompts, sampling_params=params)  # warm-up, same shapes
        engine.flush_cache()
        activities = [torch.profiler.ProfilerActivity.CPU]
        on_cuda = args.device.startswith(("cuda", "rocm"))  # ROCm's torch calls HIP "cuda"
        if on_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        before = engine.get_server_info()
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            engine.generate(input_ids=prompts, sampling_params=params)
            if on_cuda:
                torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        after = engine.get_server_info()
    finally:
        engine.shutdown()
    passes = max(1, after["forward_passes"] - before["forward_passes"])
    print(
        f"{args.batch} x ({args.input_len} in, {args.new} new), {args.device} {args.dtype}, "
        f"graphs {'off' if args.disable_graph_capture else 'on'}: {wall:.3f} s under the "
        f"profiler, {passes} passes"
    )
    print(
        "ms per pass: "
        + " ".join(
            f"{ph}={1000 * (after[ph + '_seconds'] - before[ph + '_seconds']) / passes:.2f}"
            for ph in PHASES
        )
    )
    key = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
