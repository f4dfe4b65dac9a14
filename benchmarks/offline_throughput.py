"""Offline throughput: Plait vs transformers ``generate`` on the same CPU, same weights.

    .venv/bin/python benchmarks/offline_throughput.py            # full run (a few minutes)
    .venv/bin/python benchmarks/offline_throughput.py --quick    # smaller workload

Workloads: (1) 64 requests with mixed prompt (32-512) and output (32-256) lengths, Plait's
continuous batching vs transformers in static batches of 16; (2) pure decode at batch 1 and 16;
(3) a shared-prefix workload with and without the radix cache. Prompts are random token ids
and EOS is ignored, so both systems produce exactly the requested number of tokens.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import plait


def random_requests(n: int, in_range: tuple[int, int], out_range: tuple[int, int], seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(100, 40000) for _ in range(rng.randint(*in_range))],
             rng.randint(*out_range)) for _ in range(n)]


def plait_run(engine: plait.Engine, reqs) -> float:
    """Seconds to serve all requests submitted at once."""
    ids = [p for p, _ in reqs]
    sps = [{"max_new_tokens": m, "temperature": 0, "ignore_eos": True} for _, m in reqs]
    t = time.perf_counter()
    engine.generate(input_ids=ids, sampling_params=sps)
    return time.perf_counter() - t


def hf_run(model, reqs, batch_size: int) -> float:
    """Seconds for transformers generate over static, left-padded batches."""
    t = time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        chunk = reqs[i:i + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        new = max(m for _, m in chunk)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t


def median_time(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="16 requests, shorter outputs")
    ap.add_argument("--repeats", type=int, default=3, help="runs per decode measurement")
    ap.add_argument("--skip-hf", action="store_true", help="Plait only (no baseline)")
    args = ap.parse_args()

    engine = plait.Engine()
    from transformers import AutoModelForCausalLM
    hf = None if args.skip_hf else AutoModelForCausalLM.from_pretrained(
        engine.model_dir, dtype=torch.float32).eval()
    rows = []

    n = 16 if args.quick else 64
    mixed = random_requests(n, (32, 512), (32, 64) if args.quick else (32, 256))
    out_tokens = sum(m for _, m in mixed)
    plait_run(engine, mixed[:4])  # warm-up
    engine.flush_cache()
    t_plait = plait_run(engine, mixed)
    t_hf = hf_run(hf, mixed, 16) if hf is not None else float("nan")
    rows.append((f"mixed {n} req, output tok/s", out_tokens / t_plait, out_tokens / t_hf))

    for bs in (1, 16):
        reqs = random_requests(bs, (32, 32), (64, 64), seed=bs)
        engine.flush_cache()

        def once():
            engine.flush_cache()
            return plait_run(engine, reqs)
        t_p = median_time(once, args.repeats)
        t_h = median_time(lambda: hf_run(hf, reqs, bs), args.repeats) if hf is not None else float("nan")
        rows.append((f"decode batch {bs}, tok/s (32 in, 64 out)", bs * 64 / t_p, bs * 64 / t_h))

    prefix = random_requests(1, (1000, 1000), (1, 1), seed=99)[0][0]
    shared = [(prefix + p, 16) for p, _ in random_requests(32, (32, 32), (16, 16), seed=7)]
    engine.flush_cache()
    t_cache = plait_run(engine, shared)
    engine.shutdown()
    nocache = plait.Engine(disable_radix_cache=True)
    t_nocache = plait_run(nocache, shared)
    nocache.shutdown()
    rows.append(("shared 1000-token prefix x32, req/s (cache | no cache)",
                 32 / t_cache, 32 / t_nocache))

    print(f"\nPlait on {torch.get_num_threads()} threads, SmolLM2-135M-Instruct fp32\n")
    print(f"| {'workload':<56} | {'Plait':>9} | {'baseline':>9} | {'ratio':>6} |")
    print(f"|{'-' * 58}|{'-' * 11}|{'-' * 11}|{'-' * 8}|")
    for name, a, b in rows:
        print(f"| {name:<56} | {a:>9.1f} | {b:>9.1f} | {a / b:>5.2f}x |")
    print("\nbaseline = transformers generate (static batches of the same size), except the "
          "last row, whose baseline is Plait with --disable-radix-cache.")


if __name__ == "__main__":
    main()
