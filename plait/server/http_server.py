"""The HTTP server: FastAPI app, auth, error shape, admin routes, and the uvicorn launcher.

Process layout: this process parses, tokenizes and streams; the scheduler process
(``scheduler_process.py``) owns the engine. See ``engine_client.py`` for the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import plait.server.generate_api as generate_api
import plait.server.openai_api as openai_api
import plait.server.openai_chat as openai_chat
import plait.server.lora_api as lora_api
import plait.server.openapi as openapi
from plait.core.messages import GenerateReq
from plait.server.admission_gate import AdmissionGateMiddleware
from plait.server.connection_guard import (
    ConnectionLimits,
    HeaderCountMiddleware,
    guarded_protocol,
)
from plait.server.engine_client import EngineClient
from plait.server.join import Membership, membership_for, start_joining
from plait.server.middleware import APIKeyMiddleware, BodyGuardMiddleware, JSONBodyMiddleware
from plait.server.protocol import AbortRequest, APIError, error_body
from plait.server.server_args import ServerArgs
from plait.server.submit import ClientDisconnected, collect

logger = logging.getLogger("plait.server")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error(s))"
        return JSONResponse(error_body(message, 400, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(e.detail), e.status_code),
            status_code=e.status_code,
            headers=getattr(e, "headers", None),
        )

    @app.exception_handler(ClientDisconnected)
    async def disconnected(_: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody is listening; nginx's code for the record

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(
            error_body(f"internal error: {type(e).__name__}: {e}", 500), status_code=500
        )


def settle_heap() -> None:
    """Collect, then freeze what the startup left on the heap (the tokenizer, transformers'
    and the app's modules: ~340k tracked objects), so the garbage collector's full passes walk
    only what serving allocates. Without it each full pass under 256 streams took over a second
    (issue 41: a fifth of the HTTP process's profile). Called once the server is ready."""
    gc.collect()
    gc.freeze()


def create_app(args: ServerArgs, model_path: str) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        client = EngineClient(args, model_path)
        app.state.client = client
        try:
            await client.start()
            settle_heap()
            logger.info("serving %s at http://%s:%d", client.model_name, args.host, args.port)
            yield
        finally:
            await client.shutdown()

    app = FastAPI(title="Plait", version="0.1.0", lifespan=lifespan)
    app.state.args = args
    _install_error_handlers(app)
    app.add_middleware(JSONBodyMiddleware)
    app.add_middleware(BodyGuardMiddleware, max_bytes=args.max_request_body_bytes)
    # outside the body guard: an overloaded server refuses before it reads the body
    app.add_middleware(AdmissionGateMiddleware)
    if args.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=args.api_key)
    app.add_middleware(HeaderCountMiddleware, max_count=args.max_header_count)
    app.include_router(generate_api.router)
    app.include_router(openai_api.router)
    app.include_router(openai_chat.router)
    app.include_router(lora_api.router)
    app.include_router(_admin_routes())
    openapi.install(app)
    return app


def _admin_routes():
    from fastapi import APIRouter

    router = APIRouter()

    @router.get("/health")
    async def health(request: Request) -> Response:
        client: EngineClient = request.app.state.client
        ok = client.is_alive() and not client.draining  # draining: take me out of rotation
        return Response(status_code=200 if ok else 503, media_type="text/plain")

    @router.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        """Healthy only if a one-token generation goes through the whole pipeline."""
        client: EngineClient = request.app.state.client
        if not client.is_alive():
            return Response(status_code=503, media_type="text/plain")
        probe = GenerateReq(
            input_ids=[client.tokenizer.eos_token_id or 0],
            sampling_params={"max_new_tokens": 1, "temperature": 0},
        ).expand()[0]
        try:
            await asyncio.wait_for(collect(client, [probe], None), timeout=60)
        except APIError as e:  # refused at admission (overloaded, with Retry-After) or failed
            return Response(e.message, e.status, e.headers, media_type="text/plain")
        except asyncio.TimeoutError:
            return Response(status_code=503, media_type="text/plain")
        return Response(status_code=200, media_type="text/plain")

    @router.get("/get_model_info")
    @router.get("/model_info")
    async def get_model_info(request: Request) -> dict[str, Any]:
        c: EngineClient = request.app.state.client
        return {
            "model_path": c.model_path,
            "tokenizer_path": c.model_path,
            "served_model_name": c.model_name,
            "is_generation": True,
            "context_length": c.context_length,
            "vocab_size": c.vocab_size,
            "has_image_understanding": False,
            "has_audio_understanding": False,
        }

    @router.get("/get_server_info")
    @router.get("/server_info")
    async def get_server_info(request: Request) -> dict[str, Any]:
        c: EngineClient = request.app.state.client
        engine = await c.server_info()
        return {
            **request.app.state.args.to_dict(),
            "model_path": c.model_path,
            "context_length": c.context_length,
            "version": "0.1.0",
            **engine,
            "internal_states": [engine],
            "num_inflight_requests": len(c.running_rids()),
            "dp_size": 1,
        }

    @router.get("/get_load")
    async def get_load(request: Request) -> list[dict[str, Any]]:
        """SGLang's per-rank load report, read by the gateway's load-aware policies."""
        c: EngineClient = request.app.state.client
        engine = await c.server_info()
        return [
            {
                "dp_rank": 0,
                "num_reqs": engine.get("num_running_reqs", 0) + engine.get("num_waiting_reqs", 0),
                "num_waiting_reqs": engine.get("num_waiting_reqs", 0),
                "num_tokens": engine.get("max_total_tokens", 0)
                - engine.get("available_kv_tokens", 0),
            }
        ]

    @router.post("/flush_cache")
    async def flush_cache(request: Request) -> Response:
        ok = await request.app.state.client.flush_cache()
        if ok is False or (isinstance(ok, dict) and "error" in ok):
            raise APIError("cache not flushed: requests are still running", status=400)
        return Response("Cache flushed.\n", status_code=200, media_type="text/plain")

    @router.post("/abort_request")
    async def abort_request(body: AbortRequest, request: Request) -> dict[str, Any]:
        """Abort ``rid`` (and the per-sample/per-prompt requests derived from it), or every
        running request with ``abort_all``."""
        c: EngineClient = request.app.state.client
        rids = [
            r
            for r in c.running_rids()
            if body.abort_all or r == body.rid or (body.rid and r.startswith(body.rid + "-"))
        ]
        for rid in rids:
            c.abort(rid)
        return {"aborted": rids}

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        c: EngineClient = request.app.state.client
        try:
            info = await c.server_info()
        except (APIError, asyncio.TimeoutError):
            info = None
        data, content_type = c.metrics.render(info, len(c.running_rids()))
        return Response(data, media_type=content_type)

    return router


class _DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains (``EngineClient.drain``) before uvicorn's
    own shutdown starts, so every client gets a complete response or a JSON error / an error
    event and ``[DONE]``; a second signal exits at once. ``fail()`` stops the server with a
    non-zero exit (the scheduler process died)."""

    def __init__(
        self,
        config: uvicorn.Config,
        app: FastAPI,
        shutdown_timeout: float,
        membership: Membership | None = None,
    ):
        super().__init__(config)
        self.app = app
        self.membership = membership  # --join: leave the gateway before draining
        self.shutdown_timeout = shutdown_timeout
        self.failed = False
        self._draining = False
        self._drain_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)  # runs the lifespan, which creates the client
        client = getattr(self.app.state, "client", None)
        if client is not None:
            client.on_fatal = self.fail
        if self.membership is not None and self.membership.joins and self.started:
            loop = self._loop
            start_joining(self.membership, lambda: loop.call_soon_threadsafe(self.fail))

    def fail(self) -> None:
        self.failed = True
        self.should_exit = True

    def handle_exit(self, sig: int, frame: Any) -> None:
        client = getattr(self.app.state, "client", None)
        if self._draining or client is None or self._loop is None:
            self.force_exit = self._draining
            self.should_exit = True
            return
        self._draining = True
        logger.info("draining: up to %.0fs for running requests", self.shutdown_timeout)

        def start() -> None:
            self._drain_task = self._loop.create_task(self._drain(client))

        self._loop.call_soon_threadsafe(start)

    async def _drain(self, client: EngineClient) -> None:
        try:
            if self.membership is not None:
                await asyncio.to_thread(self.membership.leave)
            await client.drain(self.shutdown_timeout)
        finally:
            self.should_exit = True


def connection_limits(args: ServerArgs) -> ConnectionLimits:
    return ConnectionLimits(
        header_timeout=args.header_read_timeout,
        body_timeout=args.body_read_timeout,
        stall_timeout=args.stream_stall_timeout,
        max_header_bytes=args.max_header_bytes,
        max_header_count=args.max_header_count,
    )


def run_server(args: ServerArgs) -> int:
    """Serve until SIGTERM/SIGINT; returns 0 after a graceful shutdown (running requests drained),
    1 if the scheduler process died or the server never started."""
    logging.basicConfig(
        level=args.log_level.upper(), format="[http] %(asctime)s %(levelname)s %(message)s"
    )
    try:
        model_path = args.resolved_model_path()
        args.engine_kwargs(model_path)  # option errors (e.g. --tp 2) before anything starts
    except ValueError as e:
        logger.error("%s", e)
        return 2
    app = create_app(args, model_path)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=args.keep_alive_timeout,
        http=guarded_protocol(connection_limits(args)),
        h11_max_incomplete_event_size=args.max_header_bytes + 1024,
    )
    server = _DrainingServer(config, app, args.shutdown_timeout, membership_for(args))
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler turns
    # that into a normal return, so a graceful SIGTERM exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0 if server.started and not server.failed else 1
