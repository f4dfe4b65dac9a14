"""Admission at overload: accepted requests' latency and throughput at 4x the sustainable rate.

Two phases against one ``plait serve`` (started here with the default model, or ``--url``):

1. **Sustainable rate**: ``--clients`` closed-loop clients (default: 1.25x the server's
   ``--max-running-requests``, so a short queue refills the batch the moment a request ends),
   each sending its next request when the last one returns, for ``--seconds``. Its throughput
   (answered requests / wall seconds) is the rate the server sustains with a full batch.
2. **Overload**: open-loop arrivals (Poisson) at ``--factor`` (4) times that rate for
   ``--seconds``. Every answer is counted by status; 200s give the accepted latency p50/p99
   (send to last byte) and the accepted throughput (200s / seconds from the first send to the
   last 200).

3. **Sustainable again**, as phase 1: on a shared machine the service rate drifts with the
   neighbours' load, so the overload is compared with the mean of the phases around it (each
   phase records the 1-minute load average at its end).

Shedding works when accepted latency stays bounded (near ``--max-queue-time`` plus one
request's service time, not growing with the overload) and accepted throughput stays at least
90 % of the sustainable rate. Requests are short completions (``--max-tokens`` new tokens,
EOS ignored) so every accepted request costs the same.

The client is cheap (:mod:`benchmarks.serving.raw_http`: raw asyncio streams, no httpx), and
``--pin`` runs the started server on core 0 (``taskset -c 0``, one engine thread) and this
client on core 1, so the load generator's CPU is not taken from the server in any phase: the
sustainable rate and the overload are measured under the same pinning. The result's
``config`` records the pinning and both processes' CPU affinity.

Memory: the server started here gets a KV pool sized to what the run needs
(``--max-total-tokens``, default ``4 * max_running * (64 + max_tokens)``) instead of the
engine's default 1 GiB budget, which made its scheduler process 2.7 GB; the result records
every process's peak RSS (``VmHWM``), the client's included.

    python -m benchmarks.serving.overload --seconds 20 --max-tokens 16 --max-queue-time 5 --pin
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from benchmarks.serving.raw_http import RawHTTP

#: ``--pin``: the server's core and the client's
SERVER_CORE, CLIENT_CORE = 0, 1

PROMPTS = [f"Request {i}: write one sentence about the number {i}." for i in range(64)]


@dataclass(kw_only=True)
class Phase:
    sent: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    first_send: float = 0.0
    last_ok: float = 0.0
    load_1m: float = 0.0  # the 1-minute load average when the phase ended

    def record(self, status: str, sent_at: float, done_at: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == "200":
            self.latencies.append(done_at - sent_at)
            self.last_ok = max(self.last_ok, done_at)

    def summary(self) -> dict:
        ok = sorted(self.latencies)
        span = max(self.last_ok - self.first_send, 1e-9)
        return {
            "sent": self.sent,
            "statuses": self.statuses,
            "accepted_per_s": len(ok) / span if ok else 0.0,
            "p50_s": statistics.median(ok) if ok else None,
            "p99_s": ok[min(len(ok) - 1, int(0.99 * len(ok)))] if ok else None,
            "load_1m_at_end": self.load_1m,
        }


async def one(client: RawHTTP, max_tokens: int, phase: Phase) -> float:
    """Send one request and record its answer; returns the ``Retry-After`` seconds of a
    refusal (0 otherwise)."""
    body = {
        "text": random.choice(PROMPTS),
        "sampling_params": {"max_new_tokens": max_tokens, "ignore_eos": True},
    }
    sent = time.monotonic()
    phase.sent += 1
    retry = 0.0
    try:
        code, headers, answer = await client.post("/generate", json.dumps(body).encode())
        status = str(code)
        retry = float(headers.get("retry-after", 0))
        if code == 200 and json.loads(answer)["meta_info"]["completion_tokens"] != max_tokens:
            status = "200-short"  # a 200 that is not the whole answer counts as a failure
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        status = type(e).__name__
    phase.record(status, sent, time.monotonic())
    return retry


def _client(url: str) -> RawHTTP:
    parts = urllib.parse.urlsplit(url)
    return RawHTTP(parts.hostname or "127.0.0.1", parts.port or 80)


async def closed_loop(url: str, clients: int, seconds: float, max_tokens: int) -> Phase:
    phase = Phase(first_send=time.monotonic())
    end = phase.first_send + seconds
    c = _client(url)

    async def loop() -> None:
        while time.monotonic() < end:
            # a refused closed-loop client waits as asked, like a real one, instead of
            # resending at once (which would load the server with refusals)
            await asyncio.sleep(min(await one(c, max_tokens, phase), end - time.monotonic()))

    await asyncio.gather(*(loop() for _ in range(clients)))
    await c.close()
    phase.load_1m = os.getloadavg()[0]
    return phase


async def open_loop(url: str, rate: float, seconds: float, max_tokens: int) -> Phase:
    phase = Phase(first_send=time.monotonic())
    end = phase.first_send + seconds
    rng = random.Random(0)
    tasks = []
    c = _client(url)
    next_at = phase.first_send
    while next_at < end:
        tasks.append(asyncio.create_task(one(c, max_tokens, phase)))
        next_at += rng.expovariate(rate)  # arrivals on schedule even when a send ran late
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*tasks)
    await c.close()
    phase.load_1m = os.getloadavg()[0]
    return phase


def start_server(port: int, extra: list[str], pin: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "plait.server.cli", "serve", "--device", "cpu"]
    env = dict(os.environ)
    if pin:  # core 0 only, one engine thread: two would fight over one core
        cmd = ["taskset", "-c", str(SERVER_CORE), *cmd]
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([*cmd, "--port", str(port), "--log-level", "warning", *extra], env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
    proc.kill()
    raise SystemExit("the server did not become healthy in 600 s")


def peak_rss_mib(root: int) -> dict[str, float]:
    """Peak RSS (``VmHWM``, MiB) of ``root`` and its children, by command name."""
    pids = [root]
    with open(f"/proc/{root}/task/{root}/children") as f:
        pids += [int(p) for p in f.read().split()]
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = f.read().split(b"\0")[2].decode()  # python -m <module>
            with open(f"/proc/{pid}/status") as f:
                hwm = next(line for line in f if line.startswith("VmHWM"))
        except (OSError, IndexError, StopIteration):
            continue
        out[f"{name}[{pid}]"] = int(hwm.split()[1]) / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--port", type=int, default=31870)
    p.add_argument("--server-args", default="", help="flags for the server started here")
    p.add_argument("--max-running", type=int, default=16, help="the started server's limit")
    p.add_argument(
        "--clients", type=int, default=None, help="phases 1 and 3 (default 1.25x --max-running)"
    )
    p.add_argument("--factor", type=float, default=4.0)
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-queue-time", type=float, default=None, help="the started server's bound")
    p.add_argument("--max-total-tokens", type=int, default=None, help="the started server's KV")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument(
        "--pin",
        action="store_true",
        help=f"the started server on core {SERVER_CORE} (one engine thread), this client on "
        f"core {CLIENT_CORE}",
    )
    a = p.parse_args()
    if a.pin:
        os.sched_setaffinity(0, {CLIENT_CORE})
    proc = None
    url = a.url
    if url is None:
        kv = a.max_total_tokens or 4 * a.max_running * (64 + a.max_tokens)
        extra = ["--max-running-requests", str(a.max_running), "--max-total-tokens", str(kv)]
        if a.max_queue_time is not None:
            extra += ["--max-queue-time", str(a.max_queue_time)]
        extra += a.server_args.split()
        proc = start_server(a.port, extra, a.pin)
        url = f"http://127.0.0.1:{a.port}"
    try:
        asyncio.run(closed_loop(url, 4, 5, a.max_tokens))  # warm-up: fills the finish rate
        clients = a.clients or math.ceil(1.25 * a.max_running)
        base = asyncio.run(closed_loop(url, clients, a.seconds, a.max_tokens))
        offered = a.factor * base.summary()["accepted_per_s"]
        if not offered:
            raise SystemExit(f"no request answered in phase 1: {base.summary()}")
        over = asyncio.run(open_loop(url, offered, a.seconds, a.max_tokens))
        after = asyncio.run(closed_loop(url, clients, a.seconds, a.max_tokens))
        rss = peak_rss_mib(proc.pid) if proc is not None else {}
        server_cpus = sorted(os.sched_getaffinity(proc.pid)) if proc is not None else None
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    sustainable = (base.summary()["accepted_per_s"] + after.summary()["accepted_per_s"]) / 2
    client_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "config": {
            **vars(a),
            "cpu_count": os.cpu_count(),
            "closed_loop_clients": clients,
            "client_cpus": sorted(os.sched_getaffinity(0)),
            "server_cpus": server_cpus,
            "client": "raw asyncio HTTP/1.1 (benchmarks/serving/raw_http.py)",
        },
        "sustainable": base.summary(),
        "overload": over.summary(),
        "sustainable_after": after.summary(),
        "offered_per_s": offered,
        "peak_rss_mib": {**rss, "client": client_mib},
    }
    result["throughput_ratio"] = result["overload"]["accepted_per_s"] / max(sustainable, 1e-9)
    print(json.dumps(result, indent=2))
    print(f"config: {json.dumps(result['config'])}", file=sys.stderr)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
