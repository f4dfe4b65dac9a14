"""Data parallelism behind SGLang's gateway: one worker vs ``--dp 2`` (cache_aware) vs
``--dp 2`` (round_robin), on one multi-tenant workload, in one run.

The workload is the serving benchmark's shared-prefix set: ``--num-groups`` tenants, each with
a ``--prefix-len``-token system prompt, requests interleaved at random. The table shows
request throughput, TTFT and the share of prompt tokens served from a radix cache, with each
data-parallel column's ratio to the single worker.

This machine has 2 cores, so the fair comparison is one worker with 2 threads against two
workers with one thread each (the ``--dp`` launcher splits cores this way by itself); more
workers than cores only adds contention.

    python -m benchmarks.serving.data_parallel --num-prompts 64 --num-groups 8 --prefix-len 512
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from benchmarks.serving import serving  # the workload, client, table

CONFIGS = [
    ("1 worker", "--device cpu", {"OMP_NUM_THREADS": "2"}),
    ("dp2 cache_aware", "--device cpu --dp 2 --router-policy cache_aware", {}),
    ("dp2 round_robin", "--device cpu --dp 2 --router-policy round_robin", {}),
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-path", default="default")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--num-groups", type=int, default=8, help="tenants (shared system prompts)")
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    args.dataset, args.range_ratio, args.warmup = "shared-prefix", 0.0, True

    from plait.models.loader import load_config
    from plait.server.server_args import ServerArgs

    args.model_path = ServerArgs(model_path=args.model_path).resolved_model_path()
    vocab = load_config(Path(args.model_path)).vocab_size

    print(
        f"multi-tenant: {args.num_prompts} requests, {args.num_groups} tenants x "
        f"{args.prefix_len}-token system prompt + {args.input_len} tokens, "
        f"{args.output_len} out, concurrency {args.max_concurrency}, {os.cpu_count()} cores"
    )
    columns = []
    for name, extra, env in CONFIGS:
        base_env = {
            k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
        }
        proc, url = serving.launch(extra, args, env={**base_env, **env})
        try:
            columns.append((name, serving.bench(url, args, vocab_size=vocab)))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    print()
    serving.print_launches(CONFIGS)
    print()
    serving.print_table(columns)


if __name__ == "__main__":
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    main()
