"""Decode throughput of quantized weights against Plait's float32, batch 1 and 16, one run.

Configurations (all CPU, float32 activations):
- ``fp32``: the GGUF file dequantized to float32 (Plait's ``--quantization none`` path);
- ``gguf``: the same file run natively (Q4_1 layers, Q8_0 embedding / LM head);
- ``gguf-a8``: ``gguf`` with ``quantization_activations="int8"`` (the AVX-512 VNNI kernel,
  llama.cpp's arithmetic; needs a CPU with VNNI);
- ``int8``: the float32 checkpoint quantized at load, int8 per-channel (LM head float).

Rounds are interleaved (every configuration once per round, for both batch sizes), so a
neighbour's load on a shared machine hits all columns alike; the table reports medians and
the ratio to fp32. Decode tok/s = generated tokens / wall time of a ``generate`` call whose
prompts are a few tokens long (prefill is negligible next to ``--new`` decode steps).

    PYTHONPATH=. OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quantized.py --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import plait

CONFIGS = {"fp32": {"quantization": "none"}, "gguf": {"quantization": "gguf"},
           "gguf-a8": {"quantization": "gguf", "quantization_activations": "int8"},
           "int8": {"quantization": "int8"}}


def decode_tps(engine: plait.Engine, batch: int, new: int) -> float:
    prompts = [f"Story {i}: once upon a time" for i in range(batch)]
    sp = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
    engine.flush_cache()
    start = time.perf_counter()
    outs = engine.generate(prompts, sp)
    elapsed = time.perf_counter() - start
    return sum(len(o["output_ids"]) for o in outs) / elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", default=None, help="a model converted from a GGUF file "
                   "(default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    engines = {name: plait.Engine(model_path=args.model_path, max_total_tokens=16384, **kw)
               for name, kw in CONFIGS.items()}
    for e in engines.values():  # warm-up: kernel load, first-call allocations
        decode_tps(e, 1, 4)
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for b in batches:
            for name, e in engines.items():
                results.setdefault((name, b), []).append(decode_tps(e, b, args.new))
    print(f"torch threads: {torch.get_num_threads()}, rounds: {args.rounds}, "
          f"new tokens: {args.new}")
    print("| batch | " + " | ".join(f"{n} tok/s" for n in engines) + " | "
          + " | ".join(f"{n}/fp32" for n in engines if n != "fp32") + " |")
    print("|---" * (1 + 2 * len(engines) - 1) + "|")
    for b in batches:
        med = {n: statistics.median(results[(n, b)]) for n in engines}
        print(f"| {b} | " + " | ".join(f"{med[n]:.1f}" for n in engines) + " | "
              + " | ".join(f"{med[n] / med['fp32']:.2f}x" for n in engines if n != "fp32")
              + " |")
    for e in engines.values():
        e.shutdown()


if __name__ == "__main__":
    main()
