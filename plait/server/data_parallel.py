"""``plait serve --dp N``: N engine workers behind SGLang's own gateway, on one port.

Plait writes no gateway of its own. The launcher starts N ordinary ``plait serve`` workers
(each its own process, port, engine and KV cache, with the machine's cores split between
them), waits until every one is healthy, then starts the gateway (``--gateway smg``, the
default, or ``sglang-router``; ``plait.server.gateway``) in front of them on
``--host``/``--port`` with ``--router-policy`` (``cache_aware`` by default). With
``--grpc-mode`` the workers serve SGLang's scheduler service over gRPC and smg tokenizes,
renders chat templates and parses tool calls and reasoning itself. Cache-aware routing,
retries, circuit breakers, health checks, rate limiting and queueing are the gateway's; its
extra flags pass through ``--router-extra-args``.

What holds:
- A worker that dies (or never becomes healthy) during start-up stops everything: the other
  workers and the gateway are terminated and the command exits 1 naming the worker.
- After start-up a dead worker is the gateway's business (it retries elsewhere and takes the
  worker out); only when the gateway itself or every worker has exited does the launcher stop,
  with exit status 1.
- SIGTERM/SIGINT stop the gateway first (no new requests), then the workers (each drains as a
  single ``plait serve`` does), and the command exits 0.
- A worker sent SIGTERM on its own (behind smg) leaves the gateway's pool, then drains and
  exits 0; the launcher and the other workers keep serving (``worker_command``).
- Every child is started with a parent-death signal, so even ``kill -9`` of the launcher
  leaves no orphan worker or gateway behind (Linux).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import replace

from plait.server.children import (
    Child,
    LaunchError,
    PortBook,
    child_env,
    connect_host,
    free_port,
    spawn,
    stop_all,
    stop_on_signals,
    supervise,
    threads_per_worker,
    wait_healthy,
)
from plait.server.gateway import (
    DP_FAILOVER_DEFAULTS,
    dp_command,
    listed_healthy,
    require_gateway,
)
from plait.server.server_args import ServerArgs

__all__ = [
    "DP_FAILOVER_DEFAULTS",
    "LaunchError",
    "PortBook",
    "free_port",
    "require_router",
    "run_data_parallel",
    "threads_per_worker",
    "worker_command",
]

log = logging.getLogger("plait.dp")


def require_router() -> None:
    """sglang-router 0.3.2 installed, or a :class:`LaunchError` naming the package."""
    require_gateway("sglang-router", "--dp")


def worker_command(args: ServerArgs, port: int) -> list[str]:
    """One worker's ``plait serve``. Behind smg it gets ``--leave-gateway`` (the launcher's
    gateway): a worker sent SIGTERM alone (scale-down, a rolling update) takes itself out of
    smg's pool before it drains, so no request is routed to it, and refused, meanwhile
    (``plait.server.join``). When the launcher stops, the gateway is gone first and the worker
    drains at once."""
    gateway = f"http://{connect_host(args.host)}:{args.port}"
    worker = replace(
        args,
        dp=1,
        host="127.0.0.1",
        port=port,
        router_extra_args=None,
        router_prometheus_port=None,
        router_dp_worker_base_port=None,
        leave_gateway=gateway if args.gateway_name == "smg" else None,
    )
    return [sys.executable, "-m", "plait.server.cli", "serve", *worker.to_argv()]


def run_data_parallel(args: ServerArgs) -> int:
    """Start ``args.dp`` workers and the gateway; serve until a signal. Returns the exit code."""
    logging.basicConfig(
        level=args.log_level.upper(), format="[dp] %(asctime)s %(levelname)s %(message)s"
    )
    try:
        args.validate()
        require_gateway(args.gateway_name, "--dp")
        args = replace(args, model_path=args.resolved_model_path())  # fetch/convert once
        args.engine_kwargs(args.model_path)  # option errors before anything starts
        ports = PortBook(args.port, args.router_prometheus_port)
        worker_ports = ports.take_range(
            args.router_dp_worker_base_port, args.dp, "--router-dp-worker-base-port"
        )
    except (LaunchError, ValueError) as e:
        log.error("%s", e)
        return 2
    stop = stop_on_signals()
    env = child_env(args.dp)
    log.info("starting %d workers with %s thread(s) each", args.dp, env.get("OMP_NUM_THREADS"))
    scheme = "grpc" if args.grpc_mode else "http"
    workers = []
    for rank, port in enumerate(worker_ports):
        workers.append(
            spawn(
                f"worker {rank} (port {port})",
                f"{scheme}://127.0.0.1:{port}",
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
        router = spawn(
            args.gateway_name,
            f"http://{connect_host(args.host)}:{args.port}",
            dp_command(args, [w.url for w in workers], metrics_port),
            env,
        )
        wait_healthy([router], "/readiness", 120, stop=stop)
        if args.gateway_name == "smg":
            wait_listed(router, {w.url for w in workers}, 120, stop)
    except LaunchError as e:
        log.error("%s; stopping the others", e)
        stop_all(([router] if router else []) + workers, args.shutdown_timeout + 10)
        return 0 if stop.is_set() else 1
    log.info(
        "%s (%s, %s workers) serving %d workers on %s",
        args.gateway_name,
        args.router_policy,
        scheme,
        args.dp,
        router.url,
    )
    status = supervise(router, workers, stop)
    stop_all([router, *workers], args.shutdown_timeout + 10)
    return status


def wait_listed(gateway: Child, urls: set[str], timeout: float, stop: threading.Event) -> None:
    """Until smg lists every worker healthy, so the command is ready only when every worker
    can be routed to; :class:`LaunchError` on timeout or the gateway's exit."""
    deadline = time.monotonic() + timeout
    while not urls <= listed_healthy(gateway.url):
        if stop.is_set():
            raise LaunchError("interrupted during start-up")
        if not gateway.alive():
            raise LaunchError(f"the gateway exited with status {gateway.proc.returncode}")
        if time.monotonic() > deadline:
            raise LaunchError(f"the gateway did not list every worker within {timeout:.0f}s")
        time.sleep(0.3)
