"""The gateway in front of a launcher's workers: SGLang's ``smg`` (default) or the older
``sglang-router`` 0.3.2, in regular or PD mode, with Plait's failover defaults.

``smg`` (SGLang Model Gateway 1.x, formerly SGLang Router) talks to HTTP workers as a proxy, or
to gRPC workers (``grpc://`` URLs, ``plait serve --grpc-mode``) as a full OpenAI server: it
tokenizes with the tokenizer at ``--model-path``, applies the chat template and parses tool
calls and reasoning itself. ``sglang-router`` 0.3.2 speaks HTTP only.

Failover defaults, passed before ``--router-extra-args`` (which come later and win):
- ``--dp`` with sglang-router 0.3.2: its circuit breaker counts a worker's 4xx answers as
  failures (any client could open every circuit with bad requests), so it is off; health checks
  (one a second, out after two misses) find a dead worker and eight retries with backoffs
  outlasting detection carry the requests it dropped (docs/serving.md).
- ``--dp`` with smg: the same health-check cadence and retries; its breaker is off too (the
  same 4xx exposure is not measured for 1.13, so the known-safe choice is kept).
- ``--pd``: the earlier defaults (a failed KV transfer is a 500 after up to
  ``--disaggregation-transfer-timeout`` seconds; eight retries of it are not wanted).
"""

from __future__ import annotations

import importlib.util
import shlex
import sys

from plait.server.children import LaunchError
from plait.server.server_args import ServerArgs

GATEWAYS = ("smg", "sglang-router")
_MODULES = {"smg": "smg", "sglang-router": "sglang_router"}
_EXTRAS = {"smg": "gateway", "sglang-router": "router"}

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
# smg counts a worker healthy again only after this many good checks (default 2): one is
# enough for a worker that joined and already answered its own readiness probe.
SMG_DP_DEFAULTS = ("--health-success-threshold", "1")
# A gRPC worker's HealthCheck is a one-token generation (or, when busy, its scheduler's next
# message): on a loaded CPU that can take longer than an HTTP /health answer. A killed worker
# still fails at once (connection refused); only a hung one takes this long to be found.
SMG_GRPC_DEFAULTS = ("--health-check-timeout-secs", "10")
# --cb-timeout-duration-secs 5: a killed PD server's failures open its circuit, and with the
# gateways' 60 s default a restarted server that already passed its health checks stayed out
# ("prefill 0/1 available (1 healthy)") for a minute; health checks take a dead one out.
PD_FAILOVER_DEFAULTS = (
    "--health-check-interval-secs",
    "2",
    "--health-failure-threshold",
    "2",
    "--health-check-timeout-secs",
    "5",
    "--cb-failure-threshold",
    "3",
    "--cb-timeout-duration-secs",
    "5",
)


def require_gateway(gateway: str, flag: str) -> None:
    """A clear error naming the package when the chosen gateway is not installed."""
    if importlib.util.find_spec(_MODULES[gateway]) is None:
        raise LaunchError(
            f"{flag} needs SGLang's gateway {gateway!r}, which is not installed: "
            f"pip install 'plait[{_EXTRAS[gateway]}]' (or pip install {gateway})"
        )


def _launcher(gateway: str) -> list[str]:
    if gateway == "smg":
        return [sys.executable, "-m", "smg", "launch"]
    return [sys.executable, "-m", "sglang_router.launch_router"]


def _common(args: ServerArgs, prometheus_port: int) -> list[str]:
    cmd = [
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
    if args.grpc_mode:
        # the gateway tokenizes and renders chat templates with the served model's tokenizer
        cmd += ["--model-path", args.model_path]
    return cmd


def dp_command(args: ServerArgs, worker_urls: list[str], prometheus_port: int) -> list[str]:
    """The gateway over ``worker_urls`` (regular mode)."""
    cmd = _launcher(args.gateway_name) + ["--worker-urls", *worker_urls]
    cmd += _common(args, prometheus_port) + list(DP_FAILOVER_DEFAULTS)
    if args.gateway_name == "smg":
        cmd += list(SMG_DP_DEFAULTS) + (list(SMG_GRPC_DEFAULTS) if args.grpc_mode else [])
    return cmd + shlex.split(args.router_extra_args or "")


def pd_command(
    args: ServerArgs, prefills: list[tuple[str, int]], decodes: list[str], prometheus_port: int
) -> list[str]:
    """The gateway in PD mode: each prefill server with its bootstrap port, then the decode
    servers."""
    cmd = _launcher(args.gateway_name) + ["--pd-disaggregation"]
    for url, bootstrap in prefills:
        cmd += ["--prefill", url, str(bootstrap)]
    for url in decodes:
        cmd += ["--decode", url]
    cmd += _common(args, prometheus_port) + list(PD_FAILOVER_DEFAULTS)
    return cmd + shlex.split(args.router_extra_args or "")


def listed_healthy(gateway_url: str) -> set[str]:
    """The worker URLs smg lists as healthy (its ``GET /workers``); empty if it does not
    answer. smg registers workers in the background after it is up, so its readiness alone
    does not mean it can route yet."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(gateway_url + "/workers", timeout=5) as resp:
            workers = json.loads(resp.read()).get("workers", [])
    except (urllib.error.URLError, OSError, ValueError):
        return set()
    return {w.get("url") for w in workers if w.get("is_healthy")}
