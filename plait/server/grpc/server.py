"""The ``plait serve --grpc-mode`` process: engine client, gRPC server, health, drain.

Lifecycle: the scheduler process starts and loads the model (``EngineClient.start``), then the
gRPC server binds ``--host:--port`` and the standard health service (``grpc.health.v1``,
which gateways and Kubernetes probe) reports SERVING. The first SIGTERM/SIGINT drains: health
goes NOT_SERVING and ``HealthCheck`` unhealthy (the gateway stops routing here), new
``Generate`` calls get UNAVAILABLE (the gateway retries them elsewhere), running ones finish
for up to ``--shutdown-timeout`` seconds, then the server stops and the command exits 0. A
second signal stops at once. If the scheduler process dies the server stops with exit 1.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from plait.server.engine_client import EngineClient
from plait.server.grpc.servicer import SchedulerServicer
from plait.server.join import membership_for, start_joining
from plait.server.server_args import ServerArgs

logger = logging.getLogger("plait.grpc")

SERVICE_NAME = "sglang.grpc.scheduler.SglangScheduler"
_MAX_MESSAGE = 256 << 20  # long prompts' token ids and logprobs; SGLang allows as much


def run_grpc_server(args: ServerArgs) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a graceful drain, 1 if the engine died or never
    started, 2 for bad options."""
    logging.basicConfig(
        level=args.log_level.upper(), format="[grpc] %(asctime)s %(levelname)s %(message)s"
    )
    try:
        model_path = args.resolved_model_path()
        args.engine_kwargs(model_path)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    try:
        return asyncio.run(_serve(args, model_path))
    except KeyboardInterrupt:
        return 0


async def _serve(args: ServerArgs, model_path: str) -> int:
    client = EngineClient(args, model_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = [0]

    def on_signal() -> None:
        signals[0] += 1
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    failed = False

    def on_fatal() -> None:
        nonlocal failed
        failed = True
        stop.set()

    try:
        await client.start()
    except Exception as e:  # noqa: BLE001 -- reported, then a clean exit 1
        logger.error("%s", e)
        await client.shutdown()
        return 1
    client.on_fatal = on_fatal
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ]
    )
    pb_grpc.add_SglangSchedulerServicer_to_server(SchedulerServicer(client, args.to_dict()), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"{_bind_host(args.host)}:{args.port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("serving %s over gRPC at %s:%d", client.model_name, args.host, args.port)
    membership = membership_for(args)
    if membership is not None and membership.joins:
        start_joining(membership, lambda: loop.call_soon_threadsafe(on_fatal))
    await stop.wait()
    if not failed and signals[0] == 1:
        if membership is not None:
            await asyncio.to_thread(membership.leave)
        await _drain(client, health, args.shutdown_timeout, stop, signals)
    await server.stop(grace=2)
    await client.shutdown()
    return 1 if failed else 0


async def _drain(
    client: EngineClient,
    health: health_aio.HealthServicer,
    timeout: float,
    stop: asyncio.Event,
    signals: list[int],
) -> None:
    """Out of rotation first, then let running requests finish (a second signal cuts it
    short)."""
    logger.info("draining: up to %.0fs for running requests", timeout)
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    stop.clear()
    drain = asyncio.create_task(client.drain(timeout))
    second = asyncio.create_task(stop.wait())
    await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
    second.cancel()
    if not drain.done():
        logger.warning(
            "second signal: stopping without waiting for %d request(s)", len(client.running_rids())
        )
        drain.cancel()


def _bind_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
