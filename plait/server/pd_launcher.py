"""``plait serve --pd XPYD``: X prefill and Y decode servers behind SGLang's gateway in PD
mode, on one port, in one command.

Each server is an ordinary ``plait serve --disaggregation-mode prefill|decode`` on a free
port (prefill servers each with a free bootstrap port); once all answer ``/health`` the
launcher starts the gateway (``--gateway smg``, the default, or ``sglang-router``) with
``--pd-disaggregation --prefill URL PORT ... --decode URL ...`` on ``--host``/``--port``.
A server sent SIGTERM on its own (scale-down, a rolling update) leaves the gateway through its
worker API, then drains: in-flight requests finish (a prefill server's KV sends included),
nothing new is routed to it, and it exits 0 (smg only; sglang-router 0.3.2 finds it by its
failing health check).
Start-up failure, supervision, signals and orphan protection are ``plait.server.children``'s,
shared with the ``--dp`` launcher.
To spread the pair over several machines, start the pieces by hand (docs/serving.md).
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import replace

from plait.server.children import (
    Child,
    LaunchError,
    PortBook,
    child_env,
    connect_host,
    spawn,
    stop_all,
    stop_on_signals,
    supervise,
    wait_healthy,
)
from plait.server.gateway import pd_command, require_gateway
from plait.server.server_args import ServerArgs

log = logging.getLogger("plait.pd")


def parse_pd(spec: str) -> tuple[int, int]:
    """``"1P1D"`` -> (1, 1); ValueError naming ``pd`` otherwise."""
    m = re.fullmatch(r"(\d+)P(\d+)D", spec or "", flags=re.IGNORECASE)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise ValueError(
            f"pd must look like 1P1D (prefill and decode server counts, each >= 1), got {spec!r}"
        )
    return int(m[1]), int(m[2])


def server_command(args: ServerArgs, mode: str, port: int, bootstrap_port: int) -> list[str]:
    """One PD server's ``plait serve``; ``--leave-gateway`` names the launcher's gateway, so a
    server sent SIGTERM alone leaves the gateway's pool before it drains (``plait.server.join``)
    and no request is routed to it, and refused, meanwhile."""
    gateway = f"http://{connect_host(args.host)}:{args.port}"  # smg: a worker API to leave by
    one = replace(
        args,
        pd=None,
        dp=1,
        host="127.0.0.1",
        port=port,
        disaggregation_mode=mode,
        disaggregation_bootstrap_port=bootstrap_port,
        router_extra_args=None,
        router_prometheus_port=None,
        router_dp_worker_base_port=None,
        disaggregation_bootstrap_base_port=None,
        leave_gateway=gateway if args.gateway_name == "smg" else None,
    )
    return [sys.executable, "-m", "plait.server.cli", "serve", *one.to_argv()]


def router_command(
    args: ServerArgs, prefills: list[tuple[str, int]], decodes: list[str], prometheus_port: int
) -> list[str]:
    return pd_command(args, prefills, decodes, prometheus_port)


def run_pd(args: ServerArgs) -> int:
    """Start the servers and the gateway; serve until a signal. Returns the exit code."""
    logging.basicConfig(
        level=args.log_level.upper(), format="[pd] %(asctime)s %(levelname)s %(message)s"
    )
    try:
        args.validate()
        n_prefill, n_decode = parse_pd(args.pd)
        require_gateway(args.gateway_name, "--pd")
        args = replace(args, model_path=args.resolved_model_path())
        args.engine_kwargs(args.model_path)
        ports = PortBook(args.port, args.router_prometheus_port)
        server_ports = ports.take_range(
            args.router_dp_worker_base_port, n_prefill + n_decode, "--router-dp-worker-base-port"
        )
        bootstraps = ports.take_range(
            args.disaggregation_bootstrap_base_port,
            n_prefill,
            "--disaggregation-bootstrap-base-port",
        )
    except (LaunchError, ValueError) as e:
        log.error("%s", e)
        return 2
    stop = stop_on_signals()
    env = child_env(n_prefill + n_decode)
    servers: list[Child] = []
    prefills: list[tuple[str, int]] = []
    for i in range(n_prefill):
        port, bootstrap = server_ports[i], bootstraps[i]
        url = f"http://127.0.0.1:{port}"
        servers.append(
            spawn(
                f"prefill {i} (port {port}, bootstrap {bootstrap})",
                url,
                server_command(args, "prefill", port, bootstrap),
                env,
            )
        )
        prefills.append((url, bootstrap))
    decodes = []
    for i in range(n_decode):
        port = server_ports[n_prefill + i]
        url = f"http://127.0.0.1:{port}"
        cmd = server_command(args, "decode", port, args.disaggregation_bootstrap_port)
        servers.append(spawn(f"decode {i} (port {port})", url, cmd, env))
        decodes.append(url)
    router: Child | None = None
    try:
        auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        wait_healthy(servers, "/health", args.startup_timeout, auth, stop)
        metrics_port = args.router_prometheus_port or ports.take()
        router = spawn(
            args.gateway_name,
            f"http://{connect_host(args.host)}:{args.port}",
            router_command(args, prefills, decodes, metrics_port),
            env,
        )
        wait_healthy([router], "/readiness", 120, stop=stop)
    except LaunchError as e:
        log.error("%s; stopping the others", e)
        stop_all(([router] if router else []) + servers, args.shutdown_timeout + 10)
        return 0 if stop.is_set() else 1
    log.info(
        "gateway serving %d prefill and %d decode server(s) on %s", n_prefill, n_decode, router.url
    )
    status = supervise(router, servers, stop)
    stop_all([router, *servers], args.shutdown_timeout + 10)
    return status
