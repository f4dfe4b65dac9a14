"""The scheduler process: owns a ``plait.Engine`` and serves it to the HTTP process over ZeroMQ.

Why a process: the engine's forward passes hold the GIL for long stretches; keeping them out of
the HTTP process means accepting, tokenizing and streaming never wait on a batch (and a batch
never waits on JSON). The engine's own background thread runs the scheduler loop; this process
adds only an asyncio loop that turns messages into engine calls.

Wire protocol (pickled; the HTTP process binds both sockets, this process connects):
  in  (HTTP -> here): the core's messages as they are (``plait.core.messages``):
                      GenerateReq (tokenized, validated, one sample, rid set) | AbortReq |
                      FlushCacheReq | GetInfoReq (answered by "reply" with their req_id) |
                      ShutdownReq
  out (here -> HTTP): {"op": "ready", "info"} | {"op": "startup_error", "message"}
                      {"op": "out", "rid", "out": <engine chunk>, "finished": bool}
                      {"op": "batch", "outs", "errors"}: a step's outputs in one message
                      (``plait.server.step_outbox``; engines with ``make_requests``/``submit``)
                      {"op": "error", "rid", "status", "message"}
                      {"op": "reply", "req_id", "result"}
Invariant: every "generate" gets exactly one finished output or one error. An
engine-side failure (finish_reason ``{"type": "error"}``) is sent as an "error" with status 500.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import json
import logging
import os
import shutil
import signal
import sys
import traceback
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from plait.core.engine import fatal_error
from plait.core.messages import (
    AbortReq,
    FlushCacheReq,
    GenerateReq,
    GetInfoReq,
    LoraReq,
    ShutdownReq,
)
from plait.server.server_args import check_mem_fraction
from plait.server.step_outbox import StepOutbox

logger = logging.getLogger("plait.scheduler_process")

_LOGPROB_KEYS = (
    "input_token_logprobs",
    "output_token_logprobs",
    "input_top_logprobs",
    "output_top_logprobs",
)


def build_engine(config: dict[str, Any]) -> Any:
    """Construct the engine named by ``engine_factory`` (default ``plait.Engine``), passing
    only options its signature accepts; a set option it does not accept is an error rather
    than silently ignored."""
    factory_path = config.get("engine_factory") or "plait:Engine"
    module, _, attr = factory_path.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    kwargs = kv_budget_from_fraction(config["engine_kwargs"])
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unsupported = sorted(set(kwargs) - set(params))
        if unsupported:
            raise ValueError(f"this engine does not accept option(s) {unsupported}")
    return factory(**kwargs)


def kv_budget_from_fraction(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``mem_fraction`` turned into ``kv_cache_memory_gb``: that fraction of
    the memory free on the device now, measured in the process that allocates the pool. On the
    CPU the tensor- or pipeline-parallel ranks share one memory, so each rank's pool gets its share of the
    fraction and all of them together stay within it."""
    kwargs = dict(kwargs)
    if "mem_fraction" not in kwargs:
        return kwargs
    fraction = kwargs.pop("mem_fraction")
    check_mem_fraction(fraction)
    device = kwargs.get("device", "cpu")
    budget = _free_device_gb(device) * fraction
    if _device_name(device) == "cpu":
        budget /= kwargs.get("tp_size", 1) * kwargs.get("pp_size", 1)
    kwargs["kv_cache_memory_gb"] = budget
    return kwargs


def _device_name(device: str) -> str:
    from plait.backends import registry

    return registry.resolve_device(device)


def _free_device_gb(device: str) -> float:
    """Memory free on the device now, for ``--mem-fraction``: what the backend measures
    (``Backend.free_memory_bytes``; on the CPU, MemAvailable)."""
    from plait.backends import registry

    backend = registry.get_backend(device)
    free = backend.free_memory_bytes()
    if free is None:
        raise ValueError(
            f"mem_fraction: cannot measure free memory on {backend.name!r}; "
            "use --max-total-tokens or --kv-cache-memory-gb"
        )
    return free / 2**30


def engine_info(engine: Any, model_path: str) -> dict[str, Any]:
    """What the HTTP process needs to validate requests: limits and the server info."""
    info = _server_info(engine)
    cfg_path = os.path.join(model_path, "config.json")
    context_length = info.get("context_length") or info.get("max_context_length")
    vocab_size = info.get("vocab_size")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            hf = json.load(f)
        context_length = context_length or hf.get("max_position_embeddings")
        vocab_size = vocab_size or hf.get("vocab_size")
    return {"context_length": context_length, "vocab_size": vocab_size, "server_info": info}


def _server_info(engine: Any) -> dict[str, Any]:
    info = engine.get_server_info() if hasattr(engine, "get_server_info") else {}
    return dict(info or {})


async def _stream(engine: Any, msg: GenerateReq) -> AsyncIterator[dict[str, Any]]:
    """Cumulative output dicts of one request, from the engine's async API. Always streamed
    from the engine: non-streaming clients still get progress for their timing metrics."""
    result = engine.async_generate_request([dataclasses.replace(msg, stream=True)])
    if inspect.isawaitable(result):
        result = await result
    if isinstance(result, dict):  # an engine that answered in one piece
        yield result
        return
    async for chunk in result:
        yield chunk


class SchedulerServer:
    def __init__(self, engine: Any, send: zmq.Socket, model_path: str):
        self.engine = engine
        self.send = send
        self.model_path = model_path
        self.tasks: dict[str, asyncio.Task] = {}
        #: submitted through the outbox and not finished (engines with ``make_requests`` and
        #: ``submit``, as ``plait.Engine``; others stream per request through ``run_request``)
        self.live: set[str] = set()
        self.outbox: StepOutbox | None = None
        if hasattr(engine, "make_requests") and hasattr(engine, "submit"):
            self.outbox = StepOutbox(asyncio.get_running_loop(), self.emit, self.live.discard)

    def emit(self, msg: dict[str, Any]) -> None:
        try:  # never block the loop on a vanished HTTP process; the parent watch ends us
            self.send.send_pyobj(msg, flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            logger.warning(
                "dropped %s for %s: HTTP process unreachable", msg.get("op"), msg.get("rid")
            )

    async def submit(self, msg: GenerateReq) -> None:
        """Tokenize and validate off the loop, then hand the request to the scheduler with the
        outbox as its output callback (a refusal is a 400, as in ``run_request``)."""
        assert self.outbox is not None
        rid = msg.rid
        try:
            reqs = await asyncio.to_thread(self.engine.make_requests, [msg])
        except ValueError as e:
            self.emit({"op": "error", "rid": rid, "status": 400, "message": str(e)})
            return
        except Exception as e:
            logger.exception("request %s failed", rid)
            self.emit(
                {"op": "error", "rid": rid, "status": 500, "message": f"{type(e).__name__}: {e}"}
            )
            return
        finally:
            self.tasks.pop(rid, None)
        self.outbox.prepare(reqs, msg.stream)
        self.live.add(rid)
        self.engine.submit(reqs, self.outbox.on_output)

    async def run_request(self, msg: GenerateReq) -> None:
        rid = msg.rid
        last: dict[str, Any] | None = None
        try:
            async for chunk in _stream(self.engine, msg):
                reason = (chunk.get("meta_info") or {}).get("finish_reason")
                if isinstance(reason, dict) and reason.get("type") == "error":
                    # the engine failed this request (not the client's doing): never a 200
                    self.emit(
                        {
                            "op": "error",
                            "rid": rid,
                            "status": 500,
                            "message": f"engine error: {reason.get('message')}",
                        }
                    )
                    return
                finished = reason is not None
                if not finished and not msg.stream:
                    # Non-streaming clients need progress only for timing metrics.
                    meta = {
                        k: v
                        for k, v in chunk.get("meta_info", {}).items()
                        if k not in _LOGPROB_KEYS
                    }
                    chunk_to_send = {**chunk, "meta_info": meta}
                else:
                    chunk_to_send = chunk
                self.emit({"op": "out", "rid": rid, "out": chunk_to_send, "finished": finished})
                last = chunk
                if finished:
                    return
            last = last or {"text": "", "output_ids": [], "meta_info": {}}
            meta = dict(last.get("meta_info") or {})
            meta["finish_reason"] = meta.get("finish_reason") or {"type": "stop", "matched": None}
            self.emit(
                {"op": "out", "rid": rid, "out": {**last, "meta_info": meta}, "finished": True}
            )
        except asyncio.CancelledError:
            self.emit(
                {
                    "op": "error",
                    "rid": rid,
                    "status": 503,
                    "message": "the scheduler is shutting down",
                }
            )
            raise
        except ValueError as e:
            self.emit({"op": "error", "rid": rid, "status": 400, "message": str(e)})
        except Exception as e:  # an engine bug must cost one request, not the server
            logger.exception("request %s failed", rid)
            self.emit(
                {"op": "error", "rid": rid, "status": 500, "message": f"{type(e).__name__}: {e}"}
            )
        finally:
            self.tasks.pop(rid, None)

    async def handle(self, msg: Any) -> bool:
        """Dispatch one message; False means shut down."""
        if isinstance(msg, GenerateReq):
            run = self.run_request if self.outbox is None else self.submit
            self.tasks[msg.rid] = asyncio.create_task(run(msg))
        elif isinstance(msg, AbortReq):
            if msg.rid in self.tasks or msg.rid in self.live:
                await asyncio.to_thread(self.engine.abort, msg.rid)
        elif isinstance(msg, (FlushCacheReq, GetInfoReq)):
            try:
                if isinstance(msg, FlushCacheReq):
                    result: Any = await asyncio.to_thread(self.engine.flush_cache)
                else:
                    result = await asyncio.to_thread(_server_info, self.engine)
            except Exception as e:
                logger.exception("%s failed", type(msg).__name__)
                result = {"error": f"{type(e).__name__}: {e}"}
            self.emit({"op": "reply", "req_id": msg.req_id, "result": result})
        elif isinstance(msg, LoraReq):
            self.emit(
                {"op": "reply", "req_id": msg.req_id, "result": await _lora(self.engine, msg)}
            )
        elif isinstance(msg, ShutdownReq):
            return False
        else:
            logger.error("ignored an unknown message: %r", msg)
        return True


async def _lora(engine: Any, msg: LoraReq) -> dict[str, Any]:
    """Load or unload an adapter; a refusal is ``{"error", "status": 400}`` naming it."""
    try:
        if msg.lora_path is None:
            await asyncio.to_thread(engine.unload_lora_adapter, msg.lora_name)
        else:
            await asyncio.to_thread(engine.load_lora_adapter, msg.lora_name, msg.lora_path)
        return {"ok": True, "loaded": await asyncio.to_thread(engine.lora_adapters)}
    except ValueError as e:
        return {"error": str(e), "status": 400}


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    # A killed HTTP process must not leave an orphan holding the model and the device.
    while not stop.is_set():
        if os.getppid() != parent_pid:
            stop.set()
        await asyncio.sleep(1.0)


async def _watch_engine(server: SchedulerServer, stop: asyncio.Event) -> str:
    """Wait until the engine reports it can serve nothing more (``engine.fatal_error``: a
    tensor-parallel rank died), end every running request with a 503 naming why, and stop:
    an engine that fails every request while ``/health`` says 200 is worse than one that
    exits, because a supervisor restarts the latter."""
    while not stop.is_set():
        reason = await asyncio.to_thread(fatal_error, server.engine)
        if reason:
            logger.error("%s; stopping so that a supervisor can restart the server", reason)
            message = f"{reason}; the server is stopping"
            for rid in list(server.tasks):
                server.emit({"op": "error", "rid": rid, "status": 503, "message": message})
            stop.set()
            return reason
        await asyncio.sleep(0.5)
    return ""


async def serve(config: dict[str, Any]) -> int:
    ctx = zmq.asyncio.Context()
    recv = ctx.socket(zmq.PULL)
    recv.connect(config["in_addr"])
    send = zmq.Context.instance().socket(zmq.PUSH)
    send.setsockopt(zmq.SNDHWM, 0)
    send.setsockopt(zmq.LINGER, 2000)
    send.connect(config["out_addr"])
    try:
        engine = await asyncio.to_thread(build_engine, config)
        info = await asyncio.to_thread(engine_info, engine, config["model_path"])
    except Exception:
        send.send_pyobj(
            {"op": "startup_error", "message": traceback.format_exc()}, flags=zmq.NOBLOCK
        )
        send.close()
        return 1
    # NOBLOCK: a connecting PUSH queues even before the peer answers, and if the HTTP process
    # is already gone there is nobody to block for.
    send.send_pyobj({"op": "ready", "info": info, "pid": os.getpid()}, flags=zmq.NOBLOCK)

    server = SchedulerServer(engine, send, config["model_path"])
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_parent(config["parent_pid"], stop))
    health = asyncio.create_task(_watch_engine(server, stop))
    stopper = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            receiver = asyncio.ensure_future(recv.recv_pyobj())
            done, _ = await asyncio.wait({receiver, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if receiver not in done:
                receiver.cancel()
                break
            if not await server.handle(receiver.result()):
                break
    finally:
        watcher.cancel()
        fatal = health.result() if health.done() else ""
        health.cancel()
        for rid, task in list(server.tasks.items()):
            await asyncio.to_thread(engine.abort, rid)
            task.cancel()
        for rid in list(server.live):
            await asyncio.to_thread(engine.abort, rid)
            server.emit(
                {
                    "op": "error",
                    "rid": rid,
                    "status": 503,
                    "message": "the scheduler is shutting down",
                }
            )
        if hasattr(engine, "shutdown"):
            await asyncio.to_thread(engine.shutdown)
        send.close()
        recv.close()
        if os.getppid() != config["parent_pid"] and config.get("ipc_dir"):
            # the HTTP process died without cleaning up (kill -9): its IPC dir is ours to remove
            shutil.rmtree(config["ipc_dir"], ignore_errors=True)
    return 1 if fatal else 0


def main() -> None:
    # Ctrl-C, `timeout` and systemd signal the whole process group; the HTTP process drains
    # its streams first and then tells this one to stop (or dies, which the watch notices).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = json.loads(sys.argv[1])
    logging.basicConfig(
        level=config.get("log_level", "INFO").upper(),
        format="[scheduler] %(asctime)s %(levelname)s %(message)s",
    )
    sys.exit(asyncio.run(serve(config)))


if __name__ == "__main__":
    main()
