"""A cheap streaming load generator for ``/generate``: so a served benchmark measures the server,
not its client (issue 41).

``serving.bench``'s httpx client costs ~0.3 ms of CPU per event (httpx's stream machinery, then
a JSON parse of every event, each of which carries the cumulative ``output_ids``): at 256
streams that is more than the server's own share. Here each stream is one raw asyncio
connection: the request is written by hand, the chunked response is read chunk by chunk, and
events are only counted (an event ends in a blank line; JSON never holds a raw newline) --
the last one is parsed for its token counts. TTFT is the first event's arrival; the ITL
reported is each request's mean gap per token after its first ((latency - ttft) / (tokens - 1)),
not per event. Same workload and result shape as ``serving.bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit

from benchmarks.serving.serving import Result, make_prompts, summarize


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, bool]:
    status = int((await reader.readline()).split()[1])
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return status, chunked


async def _chunks(reader: asyncio.StreamReader, chunked: bool):
    """The response body's pieces as they arrive (de-chunked)."""
    while True:
        if not chunked:
            data = await reader.read(1 << 16)
            if not data:
                return
            yield data
            continue
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            return
        yield (await reader.readexactly(size + 2))[:-2]


async def one_stream(host: str, port: int, ids: list[int], output_len: int) -> Result:
    body = json.dumps(
        {
            "input_ids": ids,
            "stream": True,
            "sampling_params": {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True},
        }
    ).encode()
    head = (
        f"POST /generate HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    res = Result(ok=False)
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        res.error = repr(e)
        return res
    try:
        writer.write(head + body)
        status, chunked = await _read_head(reader)
        pending, last = b"", b""
        async for data in _chunks(reader, chunked):
            if status != 200:
                res.error = f"HTTP {status}: {data[:200]!r}"
                return res
            pending += data
            end = pending.rfind(b"\n\n")
            if end < 0:
                continue
            events, pending = pending[: end + 2].split(b"\n\n")[:-1], pending[end + 2 :]
            if not res.ttft:
                res.ttft = time.perf_counter() - start
            res.events += len(events)
            for event in reversed(events):
                if event != b"data: [DONE]":
                    last = event
                    break
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        res.error = repr(e)
        return res
    finally:
        writer.close()
    meta = json.loads(last.removeprefix(b"data: ")).get("meta_info") if last else None
    if not meta or "completion_tokens" not in meta:
        res.error = f"no output event (last: {last[:200]!r})"
        return res
    res.ok, res.latency = True, time.perf_counter() - start
    res.output_tokens = meta["completion_tokens"]
    res.prompt_tokens, res.cached_tokens = (
        meta.get("prompt_tokens", 0),
        meta.get("cached_tokens", 0),
    )
    if res.output_tokens > 1:
        res.itls = [(res.latency - res.ttft) / (res.output_tokens - 1)] * (res.output_tokens - 1)
    return res


async def run_workload(url: str, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """Every prompt at once (``request_rate`` inf), at most ``max_concurrency`` in flight."""
    parts = urlsplit(url)
    limit = asyncio.Semaphore(args.max_concurrency or len(prompts))

    async def guarded(ids: list[int]) -> Result:
        async with limit:
            return await one_stream(parts.hostname, parts.port, ids, args.output_len)

    start = time.perf_counter()
    results = await asyncio.gather(*(guarded(ids) for ids in prompts))
    summary = summarize(results, time.perf_counter() - start)
    # events per stream, [DONE] not counted: fewer than its tokens when events coalesced
    summary["events_per_stream"] = sum(r.events - 1 for r in results if r.ok) / max(
        1, summary["completed"]
    )
    return summary


def bench(url: str, args: argparse.Namespace, vocab_size: int) -> dict:
    """``serving.bench``'s workload (no warm-up, no request rate) with this client."""
    if args.request_rate != float("inf") or args.warmup:
        raise ValueError("the raw SSE client runs closed-loop only, without warm-up")
    return asyncio.run(run_workload(url, make_prompts(args, vocab_size), args))
