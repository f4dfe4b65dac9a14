"""Online serving benchmark: stream requests to ``/generate`` at a request rate (Poisson) and/or a
concurrency cap, and report request throughput, output tokens/s, TTFT and ITL (median, p99).

Against a running server:
    python -m benchmarks.serving.serving --base-url http://127.0.0.1:30000 --dataset random
Or let it launch ``plait serve`` twice -- baseline and candidate, same workload -- and print
both with the ratio (default: the radix cache off vs on, which the shared-prefix set shows):
    python -m benchmarks.serving.serving --launch --dataset shared-prefix \\
        --baseline-args "--disable-radix-cache" --candidate-args ""

Datasets use random token ids (sent as input_ids, ``ignore_eos``) so lengths are exact:
  random         input_len tokens each (+- range_ratio), output_len tokens out
  shared-prefix  num_groups prefixes of prefix_len tokens, each followed by input_len unique ones
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Result:
    ok: bool
    latency: float = 0.0
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""
    events: int = 0  # data events received (sse_client counts them)


def make_prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    low, high = 100, vocab - 1

    def tokens(n: int) -> list[int]:
        return [rng.randint(low, high) for _ in range(n)]

    def length() -> int:
        spread = int(args.input_len * args.range_ratio)
        return max(1, args.input_len + rng.randint(-spread, spread))

    if args.dataset == "random":
        return [tokens(length()) for _ in range(args.num_prompts)]
    prefixes = [tokens(args.prefix_len) for _ in range(args.num_groups)]
    prompts = [prefixes[i % args.num_groups] + tokens(length()) for i in range(args.num_prompts)]
    rng.shuffle(prompts)
    return prompts


async def sse_lines(resp: httpx.Response):
    """The stream's lines, split at LF only.

    httpx's ``aiter_lines`` splits like str.splitlines, also at U+2028 or U+0085, which the
    server sends unescaped inside a JSON payload when a model samples one.
    """
    pending = b""
    async for chunk in resp.aiter_bytes():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8")
    if pending:
        yield pending.rstrip(b"\r").decode("utf-8")


async def one_request(
    client: httpx.AsyncClient, url: str, ids: list[int], output_len: int
) -> Result:
    body = {
        "input_ids": ids,
        "stream": True,
        "sampling_params": {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True},
    }
    start = time.perf_counter()
    res = Result(ok=False)
    last, seen = start, 0
    try:
        async with client.stream("POST", url + "/generate", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in sse_lines(resp):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                meta = json.loads(line[6:])["meta_info"]
                res.prompt_tokens = meta.get("prompt_tokens", 0)
                res.cached_tokens = meta.get("cached_tokens", 0)
                now, tokens = time.perf_counter(), meta["completion_tokens"]
                if tokens > seen:
                    if seen == 0:
                        res.ttft = now - start
                    else:
                        res.itls.extend([(now - last) / (tokens - seen)] * (tokens - seen))
                    last, seen = now, tokens
    except httpx.HTTPError as e:
        res.error = repr(e)
        return res
    res.ok, res.latency, res.output_tokens = True, time.perf_counter() - start, seen
    return res


async def run_workload(url: str, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    limit = asyncio.Semaphore(args.max_concurrency or len(prompts))
    rng = random.Random(args.seed + 1)
    timeout = httpx.Timeout(None, connect=30)
    limits = httpx.Limits(max_connections=args.max_concurrency or len(prompts))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def guarded(ids: list[int]) -> Result:
            async with limit:
                return await one_request(client, url, ids, args.output_len)

        tasks = []
        start = time.perf_counter()
        for ids in prompts:
            tasks.append(asyncio.create_task(guarded(ids)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok]
    itls = [x for r in ok for x in r.itls]
    errors = [r.error for r in results if not r.ok]
    return {
        "completed": len(ok),
        "failed": len(errors),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tok_per_s": sum(r.output_tokens for r in ok) / duration,
        "ttft_median_ms": 1000 * statistics.median(ttfts) if ttfts else float("nan"),
        "ttft_p99_ms": 1000 * _pct(ttfts, 0.99),
        "itl_median_ms": 1000 * statistics.median(itls) if itls else float("nan"),
        "itl_p99_ms": 1000 * _pct(itls, 0.99),
        "cached_share": (
            sum(r.cached_tokens for r in ok) / max(1, sum(r.prompt_tokens for r in ok))
        ),
        "first_error": errors[0] if errors else "",
    }


ROWS = [
    ("completed", "requests completed", "{:.0f}"),
    ("failed", "requests failed", "{:.0f}"),
    ("duration_s", "duration (s)", "{:.2f}"),
    ("request_throughput", "request throughput (req/s)", "{:.3f}"),
    ("output_tok_per_s", "output throughput (tok/s)", "{:.1f}"),
    ("ttft_median_ms", "TTFT median (ms)", "{:.1f}"),
    ("ttft_p99_ms", "TTFT p99 (ms)", "{:.1f}"),
    ("itl_median_ms", "ITL median (ms)", "{:.1f}"),
    ("itl_p99_ms", "ITL p99 (ms)", "{:.1f}"),
    ("cached_share", "prompt tokens from cache", "{:.3f}"),
]


def print_table(columns: list[tuple[str, dict]]) -> None:
    """One column per configuration; every column after the first also gets its ratio to the
    first (the baseline)."""
    names = [name for name, _ in columns]
    header = (
        f"{'metric':<30}" + f"{names[0]:>16}" + "".join(f"{n:>16}{'ratio':>8}" for n in names[1:])
    )
    print(header)
    print("-" * len(header))
    for key, label, fmt in ROWS:
        base = columns[0][1][key]
        line = f"{label:<30}" + f"{fmt.format(base):>16}"
        for _, c in columns[1:]:
            ratio = f"{c[key] / base:.2f}x" if base else "-"
            line += f"{fmt.format(c[key]):>16}{ratio:>8}"
        print(line)
    for name, c in columns:
        if c["first_error"]:
            print(f"{name}: first error: {c['first_error']}")


def print_launches(configs) -> None:
    """One line per (name, plait serve args, env) configuration a benchmark launched."""
    for name, extra, env in configs:
        print(f"{name}: plait serve {extra} {' '.join(f'{k}={v}' for k, v in env.items())}")


def launch(
    extra: str, args: argparse.Namespace, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "plait.server.cli",
        "serve",
        "--port",
        str(port),
        "--model-path",
        args.model_path,
        "--log-level",
        "warning",
        *shlex.split(extra),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL if not args.verbose else None, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"plait serve {extra!r} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("plait serve did not become healthy in 600 s")


def bench(url: str, args: argparse.Namespace, vocab_size: int | None = None) -> dict:
    if vocab_size is None:
        vocab_size = httpx.get(url + "/get_model_info", timeout=30).json()["vocab_size"]
    prompts = make_prompts(args, vocab_size)
    if args.warmup:
        asyncio.run(
            run_workload(
                url,
                prompts[:2],
                argparse.Namespace(
                    **{**vars(args), "request_rate": float("inf"), "max_concurrency": 2}
                ),
            )
        )
        httpx.post(url + "/flush_cache", timeout=60)
    return asyncio.run(run_workload(url, prompts, args))


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """The workload's arguments (dataset, sizes, concurrency, seed), shared with the other
    serving benchmarks that drive ``bench``."""
    p.add_argument("--dataset", choices=["random", "shared-prefix"], default="random")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--num-groups", type=int, default=4)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--launch", action="store_true", help="start baseline + candidate servers")
    p.add_argument("--model-path", default="default")
    p.add_argument("--baseline-args", default="--disable-radix-cache")
    p.add_argument("--candidate-args", default="")
    add_workload_arguments(p)
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests/s, Poisson arrivals (inf: all at once)",
    )
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    print(
        f"dataset={args.dataset} prompts={args.num_prompts} input_len={args.input_len} "
        f"output_len={args.output_len} rate={args.request_rate} "
        f"max_concurrency={args.max_concurrency}"
        + (
            f" prefix_len={args.prefix_len} groups={args.num_groups}"
            if args.dataset == "shared-prefix"
            else ""
        )
    )
    if not args.launch:
        print_table([("server", bench(args.base_url, args))])
        return
    columns = []
    for name, extra in (("baseline", args.baseline_args), ("candidate", args.candidate_args)):
        proc, url = launch(extra, args)
        try:
            columns.append((name, bench(url, args)))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print(
        f"baseline: plait serve {args.baseline_args}\ncandidate: plait serve "
        f"{args.candidate_args or '(defaults)'}\n"
    )
    print_table(columns)


if __name__ == "__main__":
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    main()
