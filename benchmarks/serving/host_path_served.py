"""The host path served: the null model through a real ``plait serve`` process, streamed to
concurrent HTTP clients, against the same engine offline (issue 41).

    .venv/bin/python -m benchmarks.serving.host_path_served --batch 1 64 256 --steps 64

The null model's forward costs nothing (``plait/models/null.py``), so what a served decode step
costs beyond the offline one is the serving side's: handing outputs from the scheduler to the
HTTP process, detokenizing, formatting and writing each stream's events. Per batch size ``B``,
``B`` streaming clients (``benchmarks.serving.serving``'s httpx client, ``/generate`` with
``stream``, 16-token random prompts, EOS ignored) run twice, with one new token and with
``--steps``; the served ms per decode step is ``(full - first) / (steps - 1)``, as in
``benchmarks.host_path`` (whose offline figure is measured first, in this process, and then
shut down). Reported per batch: offline and served ms/step (wall, and the CPU ms per step of
the HTTP process, the scheduler process and the client), the served step rate the server
counted (its forward passes over the run's wall time), tokens/s the clients received, and the
server's phase split (ms per forward pass, from ``/get_server_info``). Every server is killed
at the end.

The clients are ``benchmarks.serving.sse_client``'s raw asyncio streams by default (they count
events and parse only the last, so they cost far less than the server; ``--client httpx``:
``serving.bench``'s). ``--pin`` puts the server's processes on the last CPU and this process
(the clients) on the first, so that their CPU times do not mix on one core; the output says
which client and pinning ran.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import httpx
import psutil

import plait
from benchmarks import host_path
from benchmarks.harness import PHASES, phase_split, step_totals
from benchmarks.serving import serving, sse_client
from plait.models.default import default_model_path
from plait.models.null import make_null_checkpoint


def _workload(batch: int, new_tokens: int) -> argparse.Namespace:
    return argparse.Namespace(
        dataset="random",
        num_prompts=batch,
        input_len=16,
        output_len=new_tokens,
        range_ratio=0.0,
        prefix_len=0,
        num_groups=1,
        max_concurrency=batch,
        seed=batch,
        request_rate=float("inf"),
        warmup=False,
    )


def cpu_seconds(procs: list[psutil.Process]) -> list[float]:
    """User + system CPU seconds each process has used so far."""
    return [sum(p.cpu_times()[:2]) for p in procs]


_CLIENT = {"name": "raw", "vocab": 0}


def _bench(url: str, workload: argparse.Namespace) -> dict:
    """One closed-loop run with the chosen client (``--client``)."""
    if _CLIENT["name"] == "httpx":
        return serving.bench(url, workload)
    if not _CLIENT["vocab"]:
        _CLIENT["vocab"] = httpx.get(url + "/get_model_info", timeout=30).json()["vocab_size"]
    return sse_client.bench(url, workload, _CLIENT["vocab"])


def pin(server: psutil.Process) -> str:
    """The server's processes on the last CPU, this one on the first; what was done, in words."""
    cpus = sorted(psutil.Process().cpu_affinity())
    if len(cpus) < 2:
        return "not pinned (one CPU)"
    for p in (server, *server.children(recursive=True)):
        p.cpu_affinity([cpus[-1]])
    psutil.Process().cpu_affinity([cpus[0]])
    return f"server pinned to CPU {cpus[-1]}, clients to CPU {cpus[0]}"


def served(url: str, batch: int, steps: int, procs: list[psutil.Process]) -> dict[str, float]:
    """Served ms per decode step at ``batch`` streams (wall, and CPU of the HTTP process, the
    scheduler process and this client: on a loaded machine the CPU figures are what each side
    spent, the wall one includes waiting for a core), the server's steps/s, the clients'
    tokens/s and the phase split of the full run."""
    cpu0 = cpu_seconds(procs)
    first = _bench(url, _workload(batch, 1))
    cpu1 = cpu_seconds(procs)
    httpx.post(url + "/flush_cache", timeout=60)
    before = step_totals(httpx.get(url + "/get_server_info", timeout=30).json())
    cpu2 = cpu_seconds(procs)
    full = _bench(url, _workload(batch, steps))
    cpu3 = cpu_seconds(procs)
    per_step = 1000 / (steps - 1)
    cpu = [per_step * ((d - c) - (b - a)) for a, b, c, d in zip(cpu0, cpu1, cpu2, cpu3)]
    split = phase_split(before, step_totals(httpx.get(url + "/get_server_info", timeout=30).json()))
    httpx.post(url + "/flush_cache", timeout=60)
    for run in (first, full):
        if run["failed"]:
            raise SystemExit(f"{run['failed']} request(s) failed: {run['first_error']}")
    return {
        "served_ms": per_step * (full["duration_s"] - first["duration_s"]),
        "http_cpu_ms": cpu[0],
        "sched_cpu_ms": cpu[1],
        "client_cpu_ms": cpu[2],
        "server_steps_per_s": split["passes"] / full["duration_s"],
        "received_tok_per_s": full["output_tok_per_s"],
        **{k: v for k, v in split.items() if k.endswith("_ms")},
    }


def whole_run(url: str, batch: int, steps: int, procs: list[psutil.Process]) -> dict[str, float]:
    """One run of ``batch`` streams x ``steps`` tokens, nothing subtracted: its wall and each
    process's CPU seconds (steadier than ``served`` on a loaded machine)."""
    cpu0 = cpu_seconds(procs)
    run = _bench(url, _workload(batch, steps))
    cpu = [b - a for a, b in zip(cpu0, cpu_seconds(procs))]
    httpx.post(url + "/flush_cache", timeout=60)
    if run["failed"]:
        raise SystemExit(f"{run['failed']} request(s) failed: {run['first_error']}")
    return {
        "wall_s": run["duration_s"],
        "http_cpu_s": cpu[0],
        "sched_cpu_s": cpu[1],
        "client_cpu_s": cpu[2],
        "received_tok_per_s": run["output_tok_per_s"],
        "events_per_stream": run.get("events_per_stream", float("nan")),  # raw client only
    }


def offline(model: Path, batches: list[int], steps: int, rounds: int) -> dict[int, float]:
    """``benchmarks.host_path``'s wall ms per decode step, median of ``rounds``."""
    engine = plait.Engine(
        str(model),
        max_running_requests=max(batches),
        max_total_tokens=max(batches) * (16 + steps + 16),
    )
    try:
        host_path._serve(engine, max(batches), 4, False)  # warm-up
        return {
            b: statistics.median(
                host_path.measure(engine, b, steps, False)["step_ms"] for _ in range(rounds)
            )
            for b in batches
        }
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--server-args", default="", help="more `plait serve` arguments")
    ap.add_argument("--whole-run", action="store_true", help="per-run totals, no subtraction")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw", help="load generator")
    ap.add_argument("--pin", action="store_true", help="server on the last CPU, clients first")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be at least 2")
    _CLIENT["name"] = args.client
    pinned = "not pinned"
    with tempfile.TemporaryDirectory(prefix="plait-null-") as tmp:
        model = make_null_checkpoint(Path(tmp), default_model_path())
        base = offline(model, args.batch, args.steps, args.rounds)
        top = max(args.batch)
        extra = (
            f"--max-running-requests {top} --max-total-tokens {top * (16 + args.steps + 16)} "
            + args.server_args
        )
        proc, url = serving.launch(
            extra, argparse.Namespace(model_path=str(model), verbose=args.verbose)
        )
        try:
            http = psutil.Process(proc.pid)
            if args.pin:
                pinned = pin(http)
            _bench(url, _workload(2, 4))  # warm-up
            procs = [http, *http.children(), psutil.Process()]  # HTTP, scheduler, this client
            runs: dict[int, list[dict[str, float]]] = {b: [] for b in args.batch}
            for _ in range(args.rounds):
                for b in args.batch:
                    measure = whole_run if args.whole_run else served
                    runs[b].append(measure(url, b, args.steps, procs))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except Exception:
                proc.kill()
                proc.wait()
    print(f"null model, greedy, {args.steps} steps, {args.rounds} rounds; serve {extra}")
    print(f"client: {args.client}; {pinned}")
    cols = ["served_ms", "http_cpu_ms", "sched_cpu_ms", "client_cpu_ms"]
    cols += ["server_steps_per_s", "received_tok_per_s"] + [f"{p}_ms" for p in PHASES]
    if args.whole_run:
        cols = list(runs[args.batch[0]][0])
    print("| batch | offline ms/step | " + " | ".join(cols) + " |")
    print("|---:|---:|" + "---:|" * len(cols))
    for b in args.batch:
        med = {c: statistics.median(r[c] for r in runs[b]) for c in cols}
        print(f"| {b} | {base[b]:.3f} | " + " | ".join(f"{med[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
