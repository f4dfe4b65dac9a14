"""``plait serve --dp N``: N engine workers behind SGLang's own gateway, on one port.

Plait writes no gateway of its own. The launcher starts N ordinary ``plait serve`` workers
(each its own process, port, engine and KV cache, with the machine's cores split between
them), waits until every one answers ``/health``, then starts ``sglang-router``'s
``launch_router`` in front of them on ``--host``/``--port`` with ``--router-policy``
(``cache_aware`` by default). Cache-aware routing, retries, circuit breakers, health checks,
rate limiting and queueing are the gateway's; its extra flags pass through
``--router-extra-args``.

What holds:
- A worker that dies (or never becomes healthy) during start-up stops everything: the other
  workers and the gateway are terminated and the command exits 1 naming the worker.
- After start-up a dead worker is the gateway's business (it retries elsewhere and takes the
  worker out); only when the gateway itself or every worker has exited does the launcher stop,
  with exit status 1.
- SIGTERM/SIGINT stop the gateway first (no new requests), then the workers (each drains as a
  single ``plait serve`` does), and the command exits 0.
- Every child is started with a parent-death signal, so even ``kill -9`` of the launcher
  leaves no orphan worker or gateway behind (Linux).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace

from plait.server.server_args import ServerArgs

log = logging.getLogger("plait.dp")

ROUTER_PACKAGE = "sglang-router"
ROUTER_POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")
# sglang-router 0.3.2 records every non-2xx answer, 4xx included, as a circuit-breaker failure,
# so any client could open every worker's circuit with bad requests: the breaker is off and a
# dead worker is found by health checks instead (one a second, out after two misses). A request
# that meets the dead worker before then fails with a 5xx, which the gateway retries (it never
# retries a 4xx): the backoffs (0.2+0.4+0.8+1.6+2+2+2 s) outlast the ~3 s the health checker
# needs, so the retry finds the survivor. ``--router-extra-args`` come later and override these.
DP_FAILOVER_DEFAULTS = (
    "--disable-circuit-breaker",
    "--health-check-interval-secs",
    "1",
    "--health-failure-threshold",
    "2",
    "--health-check-timeout-secs",
    "2",
    "--retry-max-retries",
    "8",
    "--retry-initial-backoff-ms",
    "200",
    "--retry-backoff-multiplier",
    "2",
    "--retry-max-backoff-ms",
    "2000",
)
# ``plait serve --pd`` (pd_launcher.py) still passes these, the earlier defaults: there a
# failed KV transfer is a 500 after up to ``--disaggregation-transfer-timeout`` seconds, and
# eight retries of it are not what its tests and docs describe. Its 4xx exposure is the same.
FAILOVER_DEFAULTS = (
    "--health-check-interval-secs",
    "2",
    "--health-failure-threshold",
    "2",
    "--health-check-timeout-secs",
    "5",
    "--cb-failure-threshold",
    "3",
)
_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """Start-up failed; the message says which process and why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PortBook:
    """Ports promised to child processes that may not have bound them yet.

    :func:`free_port` only says a port is free now: a worker binds its port seconds later,
    after loading its model, so a second call can hand out the same port again, or the
    gateway's own ``--port`` (free until the gateway starts last). Every port a launcher
    gives out comes from one book, which never repeats one or hands out a reserved one."""

    def __init__(self, *reserved: int | None):
        self.taken = {p for p in reserved if p}

    def take(self) -> int:
        for _ in range(100):
            port = free_port()
            if port not in self.taken:
                self.taken.add(port)
                return port
        raise RuntimeError(f"no free port outside the {len(self.taken)} already promised")


def threads_per_worker(dp: int, cores: int | None = None) -> int:
    """Cores split evenly between workers, at least one each: oversubscribed OpenMP threads
    spin on busy cores and make every small op wait a time slice."""
    return max(1, (cores or os.cpu_count() or 1) // dp)


def stop_on_signals() -> threading.Event:
    """An event SIGTERM/SIGINT set: the launchers' main loops wait on it."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def child_env(processes: int) -> dict[str, str]:
    """This environment, with each child's thread count set to its share of the cores unless
    the user chose one (``OMP_NUM_THREADS``)."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        n = threads_per_worker(processes)
        env.update(OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
    return env


def _die_with_parent() -> None:
    """preexec_fn: deliver SIGTERM to the child when the launcher dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: clean shutdown still covers normal exits
        pass


@dataclass
class Child:
    """One started process: a worker or the gateway."""

    name: str
    url: str
    proc: subprocess.Popen

    def alive(self) -> bool:
        return self.proc.poll() is None


def require_router() -> None:
    if importlib.util.find_spec("sglang_router") is None:
        raise LaunchError(
            f"--dp needs SGLang's gateway, which is not installed: "
            f"pip install 'plait[router]' (or pip install {ROUTER_PACKAGE})"
        )


def worker_command(args: ServerArgs, port: int) -> list[str]:
    worker = replace(
        args, dp=1, host="127.0.0.1", port=port, router_extra_args=None, router_prometheus_port=None
    )
    return [sys.executable, "-m", "plait.server.cli", "serve", *worker.to_argv()]


def router_command(args: ServerArgs, worker_urls: list[str], prometheus_port: int) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--worker-urls",
        *worker_urls,
        "--policy",
        args.router_policy,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(prometheus_port),
        "--log-level",
        "warn" if args.log_level == "warning" else args.log_level,
    ]
    if args.api_key:
        cmd += ["--api-key", args.api_key]  # the gateway authenticates to the workers with it
    return cmd + list(DP_FAILOVER_DEFAULTS) + shlex.split(args.router_extra_args or "")


def _spawn(name: str, url: str, cmd: list[str], env: dict[str, str]) -> Child:
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
    return Child(name, url, proc)


def _healthy(url: str, path: str, headers: dict[str, str]) -> bool:
    req = urllib.request.Request(url + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(
    children: list[Child],
    path: str,
    timeout: float,
    headers: dict[str, str] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Block until every child answers ``path`` with 200; a child that exits first, or the
    deadline, is a :class:`LaunchError` naming it."""
    pending = list(children)
    deadline = time.monotonic() + timeout
    while pending:
        if stop is not None and stop.is_set():
            raise LaunchError("interrupted during start-up")
        for child in list(pending):
            if not child.alive():
                raise LaunchError(
                    f"{child.name} exited with status {child.proc.returncode} "
                    f"during start-up (its log is above)"
                )
            if _healthy(child.url, path, headers or {}):
                pending.remove(child)
        if pending and time.monotonic() > deadline:
            names = ", ".join(c.name for c in pending)
            raise LaunchError(f"{names} did not become healthy within {timeout:.0f}s")
        time.sleep(0.3)


def stop_all(children: list[Child], timeout: float) -> None:
    """SIGTERM in order (the gateway first), then SIGKILL whatever outlives ``timeout``."""
    for child in children:
        if child.alive():
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", child.name, timeout)
            child.proc.kill()
            child.proc.wait()


def run_data_parallel(args: ServerArgs) -> int:
    """Start ``args.dp`` workers and the gateway; serve until a signal. Returns the exit code."""
    logging.basicConfig(
        level=args.log_level.upper(), format="[dp] %(asctime)s %(levelname)s %(message)s"
    )
    try:
        args.validate()
        require_router()
        args = replace(args, model_path=args.resolved_model_path())  # fetch/convert once
        args.engine_kwargs(args.model_path)  # option errors before anything starts
    except (LaunchError, ValueError) as e:
        log.error("%s", e)
        return 2
    stop = stop_on_signals()
    env = child_env(args.dp)
    log.info("starting %d workers with %s thread(s) each", args.dp, env.get("OMP_NUM_THREADS"))
    ports = PortBook(args.port, args.router_prometheus_port)
    workers = []
    for rank in range(args.dp):
        port = ports.take()
        workers.append(
            _spawn(
                f"worker {rank} (port {port})",
                f"http://127.0.0.1:{port}",
                worker_command(args, port),
                env,
            )
        )
    router: Child | None = None
    try:
        auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        wait_healthy(workers, "/health", args.startup_timeout, auth, stop)
        metrics_port = args.router_prometheus_port or ports.take()
        log.info("gateway metrics on http://127.0.0.1:%d/metrics", metrics_port)
        router = _spawn(
            "sglang-router",
            f"http://{_connect_host(args.host)}:{args.port}",
            router_command(args, [w.url for w in workers], metrics_port),
            env,
        )
        wait_healthy([router], "/readiness", 120, stop=stop)
    except LaunchError as e:
        log.error("%s; stopping the others", e)
        stop_all(([router] if router else []) + workers, args.shutdown_timeout + 10)
        return 0 if stop.is_set() else 1
    log.info("gateway (%s) serving %d workers on %s", args.router_policy, args.dp, router.url)
    status = _supervise(router, workers, stop)
    stop_all([router, *workers], args.shutdown_timeout + 10)
    return status


def _supervise(router: Child, workers: list[Child], stop: threading.Event) -> int:
    reported: set[str] = set()
    while not stop.wait(0.5):
        if not router.alive():
            log.error("the gateway exited with status %s; stopping", router.proc.returncode)
            return 1
        for w in workers:
            if not w.alive() and w.name not in reported:
                reported.add(w.name)
                log.warning(
                    "%s exited with status %s; the gateway routes around it",
                    w.name,
                    w.proc.returncode,
                )
        if len(reported) == len(workers):
            log.error("every worker has exited; stopping")
            return 1
    return 0


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
