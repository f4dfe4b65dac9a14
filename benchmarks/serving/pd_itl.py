"""Prefill/decode disaggregation: inter-token latency of running decodes while long prompts
arrive, a unified server vs ``plait serve --pd 1P1D`` (SGLang's gateway in PD mode), in one run.

Workload (random token ids, seeded, the same for both configurations):
  short   ``--short-clients`` clients stream ``--short-len``-token prompts with
          ``--short-out`` tokens out, back to back, for the whole run (the running decodes)
  long    ``--num-long`` prompts of ``--long-len`` tokens (``--long-out`` out), the first
          ``--long-start`` s in, then one every ``--long-interval`` s
The run ends when every long prompt has finished (short requests in flight then complete).
The table shows the short requests' ITL (p50/p99/max, and how many gaps exceeded 1 s) and
TTFT, the long prompts' TTFT, overall throughput (output tok/s and requests/s over the run)
and, for 1P1D, the KV the decode server received (its ``/get_server_info`` counters
``kv_transfers``, ``kv_bytes_received``, ``kv_transfer_seconds``, read before and after).

Threads: the unified server gets ``--unified-threads`` (default 2, all the cores of the
2-core machine this was written on); under ``--pd 1P1D`` the launcher gives the prefill and the
decode server one thread each. The same total cores either way; the gateway process (Rust,
mostly idle) comes on top in 1P1D, and its requests pass through it while the unified
server is reached directly. Both run with defaults (no chunked prefill).

    python -m benchmarks.serving.pd_itl         # about 3 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import time
from pathlib import Path

import httpx

from benchmarks.serving import serving  # the client, percentiles, launch

KV_COUNTERS = ("kv_transfers", "kv_bytes_received", "kv_transfer_seconds")
STALL_S = 1.0  # an inter-token gap this long is a running decode stalled behind a prefill


def child_server(pid: int, mode: str) -> str:
    """URL of the ``--disaggregation-mode mode`` server that the launcher ``pid`` started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if (
            ppid == pid
            and "--disaggregation-mode" in cmd
            and cmd[cmd.index("--disaggregation-mode") + 1] == mode
        ):
            return f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
    raise SystemExit(f"no {mode} server under the --pd launcher (pid {pid})")


def kv_counters(url: str) -> dict[str, float]:
    info = httpx.get(url + "/get_server_info", timeout=60).json()
    return {k: float(info[k]) for k in KV_COUNTERS}


async def run(url: str, args: argparse.Namespace, vocab: int) -> dict:
    rng = random.Random(args.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randint(100, vocab - 1) for _ in range(n)]

    shorts_pool = [tokens(args.short_len) for _ in range(256)]
    longs = [tokens(args.long_len) for _ in range(args.num_long)]
    shorts: list[serving.Result] = []
    done = asyncio.Event()
    timeout = httpx.Timeout(None, connect=30)
    limits = httpx.Limits(max_connections=args.short_clients + args.num_long + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def short_client(i: int) -> None:
            k = i
            while not done.is_set():
                ids = shorts_pool[k % len(shorts_pool)]
                k += args.short_clients
                shorts.append(await serving.one_request(client, url, ids, args.short_out))

        async def long_request(i: int) -> serving.Result:
            await asyncio.sleep(args.long_start + i * args.long_interval)
            return await serving.one_request(client, url, longs[i], args.long_out)

        start = time.perf_counter()
        clients = [asyncio.create_task(short_client(i)) for i in range(args.short_clients)]
        long_results = await asyncio.gather(*(long_request(i) for i in range(args.num_long)))
        done.set()
        await asyncio.gather(*clients)
        duration = time.perf_counter() - start
    results = shorts + list(long_results)
    ok = [r for r in results if r.ok]
    itls = [x for r in shorts if r.ok for x in r.itls]
    return {
        "short_completed": sum(r.ok for r in shorts),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "itl_p50_ms": 1000 * serving._pct(itls, 0.5),
        "itl_p99_ms": 1000 * serving._pct(itls, 0.99),
        "itl_max_ms": 1000 * max(itls, default=float("nan")),
        "stalls": sum(x > STALL_S for x in itls),
        "short_ttft_p50_ms": 1000 * serving._pct([r.ttft for r in shorts if r.ok], 0.5),
        "long_ttft_p50_ms": 1000 * serving._pct([r.ttft for r in long_results if r.ok], 0.5),
        "long_ttft_max_ms": 1000
        * max((r.ttft for r in long_results if r.ok), default=float("nan")),
        "output_tok_per_s": sum(r.output_tokens for r in ok) / duration,
        "request_throughput": len(ok) / duration,
        "first_error": next((r.error for r in results if not r.ok), ""),
    }


ROWS = [
    ("short_completed", "short requests completed", "{:.0f}"),
    ("failed", "requests failed", "{:.0f}"),
    ("duration_s", "duration (s)", "{:.1f}"),
    ("itl_p50_ms", "short ITL p50 (ms)", "{:.1f}"),
    ("itl_p99_ms", "short ITL p99 (ms)", "{:.1f}"),
    ("itl_max_ms", "short ITL max (ms)", "{:.1f}"),
    ("stalls", f"short ITLs over {STALL_S:g} s", "{:.0f}"),
    ("short_ttft_p50_ms", "short TTFT p50 (ms)", "{:.1f}"),
    ("long_ttft_p50_ms", "long TTFT p50 (ms)", "{:.1f}"),
    ("long_ttft_max_ms", "long TTFT max (ms)", "{:.1f}"),
    ("output_tok_per_s", "output throughput (tok/s)", "{:.2f}"),
    ("request_throughput", "request throughput (req/s)", "{:.3f}"),
]


def print_table(columns: list[tuple[str, dict]]) -> None:
    (base_name, base), (name, cand) = columns
    header = f"{'metric':<30}{base_name:>14}{name:>14}{'ratio':>8}"
    print(header + "\n" + "-" * len(header))
    for key, label, fmt in ROWS:
        ratio = f"{cand[key] / base[key]:.2f}x" if base[key] else "-"
        print(f"{label:<30}{fmt.format(base[key]):>14}{fmt.format(cand[key]):>14}{ratio:>8}")
    for n, c in columns:
        if c["first_error"]:
            print(f"{n}: first error: {c['first_error']}")


def print_kv(kv: dict[str, float], args: argparse.Namespace) -> None:
    n, nbytes, secs = kv["kv_transfers"], kv["kv_bytes_received"], kv["kv_transfer_seconds"]
    if not n:
        print("no KV transfers recorded")
        return
    rate = nbytes / secs if secs else float("nan")
    print(
        f"KV moved prefill -> decode (Mooncake, TCP): {n:.0f} transfers, "
        f"{nbytes / 2**20:.1f} MiB, {nbytes / n / 2**20:.2f} MiB/request mean, "
        f"{1000 * secs / n:.1f} ms/transfer mean, {rate / 2**20:.0f} MiB/s; "
        f"a {args.long_len}-token prompt is ~{args.kv_per_token * args.long_len / 2**20:.1f} "
        f"MiB, ~{1000 * args.kv_per_token * args.long_len / rate:.0f} ms at that rate"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-path", default="default")
    p.add_argument("--short-clients", type=int, default=4)
    p.add_argument("--short-len", type=int, default=32)
    p.add_argument("--short-out", type=int, default=32)
    p.add_argument("--num-long", type=int, default=4)
    p.add_argument("--long-len", type=int, default=2000)
    p.add_argument("--long-out", type=int, default=4)
    p.add_argument("--long-start", type=float, default=5.0)
    p.add_argument("--long-interval", type=float, default=8.0)
    p.add_argument("--unified-threads", type=int, default=2)
    p.add_argument(
        "--transfer-timeout",
        type=float,
        default=300.0,
        help="1P1D's --disaggregation-transfer-timeout: it also covers a request's "
        "wait in the prefill server's queue, which long prompts make long",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    for name in (
        "short_clients",
        "short_len",
        "short_out",
        "num_long",
        "long_len",
        "long_out",
        "unified_threads",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")

    from plait.models.llama import head_dim_of
    from plait.models.loader import load_config
    from plait.server.server_args import ServerArgs

    args.model_path = ServerArgs(model_path=args.model_path).resolved_model_path()
    cfg = load_config(Path(args.model_path))
    # K and V of every layer, float32 (the CPU's default --dtype)
    args.kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim_of(cfg) * 4

    print(
        f"{args.short_clients} short clients ({args.short_len} in, {args.short_out} out, back "
        f"to back) + {args.num_long} long prompts ({args.long_len} in, {args.long_out} out) "
        f"from {args.long_start:.0f}s every {args.long_interval:.0f}s; {os.cpu_count()} cores"
    )
    base_env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    }
    t = str(args.unified_threads)
    configs = [
        (f"unified({t}t)", "--device cpu", {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t}),
        (
            "1P1D(1t+1t)",
            (f"--device cpu --pd 1P1D --disaggregation-transfer-timeout {args.transfer_timeout:g}"),
            {},
        ),
    ]
    columns, kv = [], {}
    for name, extra, env in configs:
        proc, url = serving.launch(extra, args, env={**base_env, **env})
        try:
            decode = child_server(proc.pid, "decode") if "--pd" in extra else None
            # warm-up: one short and one 256-token request (Mooncake's first handshake in 1P1D)
            warm = argparse.Namespace(
                **{
                    **vars(args),
                    "num_long": 1,
                    "long_len": 256,
                    "long_start": 0.0,
                    "short_clients": 1,
                    "seed": args.seed + 1,
                }
            )
            asyncio.run(run(url, warm, cfg.vocab_size))
            before = kv_counters(decode) if decode else None
            columns.append((name, asyncio.run(run(url, args, cfg.vocab_size))))
            if decode:
                after = kv_counters(decode)
                kv = {k: after[k] - before[k] for k in KV_COUNTERS}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    print()
    serving.print_launches(configs)
    print()
    print_table(columns)
    print()
    print_kv(kv, args)


if __name__ == "__main__":
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    main()
