"""The TPU backend's JAX runner on JAX's CPU device vs the torch CPU backend: decode tok/s.

    PYTHONPATH=. .venv/bin/python benchmarks/tpu_jax_cpu.py [--repeats 3]

Information, not a target: ``PLAIT_TPU_PLATFORM=cpu`` is a development mode (pure-JAX attention,
XLA's CPU code generator), and nothing here says how the backend runs on a TPU. Both engines
are loaded side by side and their runs alternate (A/B interleaved) after a warm-up that
compiles every jit bucket the workload touches; the table reports medians and the ratio.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

import plait


def decode_run(engine: plait.Engine, batch: int, prompt_len: int = 32, new: int = 64) -> float:
    """Output tokens per second for ``batch`` random prompts decoded together."""
    rng = random.Random(batch)
    ids = [[rng.randrange(100, 40000) for _ in range(prompt_len)] for _ in range(batch)]
    engine.flush_cache()
    t = time.perf_counter()
    engine.generate(input_ids=ids, sampling_params={"max_new_tokens": new, "temperature": 0,
                                                    "ignore_eos": True})
    return batch * new / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    os.environ["PLAIT_TPU_PLATFORM"] = "cpu"
    engines = {dev: plait.Engine(device=dev, dtype="float32") for dev in ("cpu", "tpu")}
    rows = []
    for batch in args.batches:
        for e in engines.values():
            decode_run(e, batch)  # warm-up: jit compiles happen here
        runs: dict[str, list[float]] = {dev: [] for dev in engines}
        for _ in range(args.repeats):
            for dev, e in engines.items():
                runs[dev].append(decode_run(e, batch))
        cpu, tpu = statistics.median(runs["cpu"]), statistics.median(runs["tpu"])
        rows.append((batch, tpu, cpu))
    compiles = engines["tpu"].get_server_info()["jit_compiles"]
    for e in engines.values():
        e.shutdown()
    print(f"torch threads: {torch.get_num_threads()}; jit compiles: {compiles}")
    print("| decode batch (32 in, 64 out) | tpu (JAX on CPU) tok/s | cpu (torch) tok/s | ratio |")
    print("|---|---|---|---|")
    for batch, tpu, cpu in rows:
        print(f"| {batch} | {tpu:.1f} | {cpu:.1f} | {tpu / cpu:.2f}x |")


if __name__ == "__main__":
    main()
