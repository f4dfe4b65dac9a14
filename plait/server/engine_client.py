"""The HTTP process's handle on the scheduler process: launches it, tokenizes, and routes its
output messages to one asyncio queue per request.

A request's stream ends in exactly one of: a finished output, an error (raised as
``APIError``), or the consumer going away -- in which case the request is aborted so its KV
slots are freed (a client that disconnects must not keep a batch slot busy).

Admission (``admit``, :mod:`plait.server.admission`): sequences beyond ``max_running_requests +
max_queued_requests`` get 429, a request predicted to wait longer than ``max_queue_time`` in
the queue gets 503, and none at all once draining (503). Failure: if the scheduler process dies, every waiting
request gets 503 and ``on_fatal`` (set by the launcher) stops the server with a non-zero exit.
The IPC directory is named ``plait-ipc-<pid>-*`` so a later start can remove the ones whose
owner was killed (kill -9 runs no code; the scheduler process also removes it when orphaned).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, AsyncIterator, Callable, Iterator

import zmq
import zmq.asyncio

from plait.core.messages import (
    AbortReq,
    FlushCacheReq,
    LoraReq,
    GenerateReq,
    GetInfoReq,
    RequestLimits,
    ShutdownReq,
)
from plait.server.admission import ARRIVAL, AdmissionControl
from plait.server.metrics import ServerMetrics
from plait.server.protocol import MAX_SEQUENCES, MAX_TOP_LOGPROBS, APIError
from plait.server.server_args import ServerArgs
from plait.server.stream_text import StreamText, latest_item, route_batch

logger = logging.getLogger("plait.server")


class EngineClient:
    def __init__(self, args: ServerArgs, model_path: str):
        self.args = args
        self.model_path = model_path
        self.model_name = args.model_name(model_path)
        self.lora_enabled = bool(args.lora_paths) or args.max_lora_rank is not None
        self.tokenizer: Any = None
        self.context_length: int | None = None
        self.vocab_size: int | None = None
        self.max_token_chars = 1
        self.started_at = time.time()
        self.proc: subprocess.Popen | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._texts: dict[str, StreamText] = {}  # per running request, for "batch" messages
        self._replies: dict[int, asyncio.Future] = {}
        self._req_ids = itertools.count()
        remove_stale_ipc_dirs()
        self._ipc_dir = tempfile.mkdtemp(prefix=f"{IPC_PREFIX}{os.getpid()}-")
        #: sequences of admitted HTTP requests not yet finished, and the queue-time bound
        self.admission = AdmissionControl(
            running_slots=args.max_running_requests,
            max_queued=args.max_queued_requests,
            max_queue_time=args.max_queue_time or None,
        )
        self.draining = False
        self.on_fatal: Callable[[], None] | None = None
        self._ctx = zmq.asyncio.Context()
        self._recv: zmq.asyncio.Socket | None = None
        self._send: zmq.Socket | None = None
        self._recv_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self.metrics = ServerMetrics()
        self.last_message = 0.0  # monotonic time of the scheduler process's latest message

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Spawn the scheduler process and wait until its engine is loaded."""
        in_addr = f"ipc://{self._ipc_dir}/in"
        out_addr = f"ipc://{self._ipc_dir}/out"
        self._send = zmq.Context.instance().socket(zmq.PUSH)
        self._send.setsockopt(zmq.SNDHWM, 0)
        self._send.setsockopt(zmq.LINGER, 0)
        self._send.bind(in_addr)
        self._recv = self._ctx.socket(zmq.PULL)
        self._recv.bind(out_addr)
        config = {
            "in_addr": in_addr,
            "out_addr": out_addr,
            "parent_pid": os.getpid(),
            "ipc_dir": self._ipc_dir,
            "model_path": self.model_path,
            "log_level": self.args.log_level,
            "engine_kwargs": self.args.engine_kwargs(self.model_path),
            "engine_factory": self.args.engine_factory,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "plait.server.scheduler_process", json.dumps(config)]
        )
        tokenizer_task = asyncio.create_task(asyncio.to_thread(self._load_tokenizer))
        msg = await self._wait_ready()
        await tokenizer_task
        info = msg["info"]
        self.context_length = info.get("context_length")
        self.vocab_size = info.get("vocab_size") or len(self.tokenizer)
        self._recv_task = asyncio.create_task(self._recv_loop())
        self._watch_task = asyncio.create_task(self._watch_process())

    def _load_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        # Longest token text (byte-level tokens spell each byte as one char: an upper bound).
        self.max_token_chars = max(map(len, self.tokenizer.get_vocab()), default=1) or 1

    async def _wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.args.startup_timeout
        while time.monotonic() < deadline:
            if await self._recv.poll(timeout=500):
                msg = await self._recv.recv_pyobj()
                if msg["op"] == "ready":
                    return msg
                if msg["op"] == "startup_error":
                    raise RuntimeError("the scheduler process failed to start:\n" + msg["message"])
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the scheduler process exited with {self.proc.returncode} before it was ready"
                )
        raise RuntimeError(
            f"the scheduler process was not ready in {self.args.startup_timeout:.0f}s"
        )

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self._recv_task is not None

    async def shutdown(self, timeout: float = 15.0) -> None:
        """Abort what is running, ask the scheduler process to exit, then make sure it did."""
        if self._watch_task is not None:
            # the scheduler is about to exit on purpose: that is no longer a fatal death
            self._watch_task.cancel()
        for rid in list(self._queues):
            self._queues[rid].put_nowait(("error", 503, "the server is shutting down"))
        if self.proc is not None and self.proc.poll() is None:
            if self._send is not None:
                self._post(ShutdownReq())
            try:
                await asyncio.to_thread(self.proc.wait, timeout)
            except subprocess.TimeoutExpired:
                logger.warning("scheduler process did not exit in %.0fs; killing it", timeout)
                self.proc.kill()
                self.proc.wait()
        for task in (self._recv_task, self._watch_task):
            if task is not None:
                task.cancel()
        for sock in (self._send, self._recv):
            if sock is not None:
                sock.close(linger=0)
        shutil.rmtree(self._ipc_dir, ignore_errors=True)

    async def _watch_process(self) -> None:
        """If the scheduler process dies, fail every waiting request instead of hanging."""
        while self.proc.poll() is None:
            await asyncio.sleep(0.5)
        logger.error(
            "the scheduler process exited with %s; stopping the server", self.proc.returncode
        )
        self.draining = True
        for q in self._queues.values():
            q.put_nowait(("error", 503, "the scheduler process exited"))
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(APIError("the scheduler process exited", status=503))
        if self.on_fatal is not None:
            self.on_fatal()

    # ------------------------------------------------------------------ admission and drain
    @contextlib.contextmanager
    def admit(self, count: int) -> Iterator[None]:
        """Hold ``count`` sequences' places for one HTTP request: 503 while draining, 429 with
        Retry-After when the running batch and the queue are full, 503 with Retry-After when
        the time since the request arrived (:data:`ARRIVAL`) plus its predicted queue wait
        passes the bound. A request's count never exceeds the limit: the core refused it
        (``limits.max_sequences``, a 400) before."""
        if self.draining:
            raise APIError("the server is shutting down", status=503)
        arrived = ARRIVAL.get()
        waited = 0.0 if arrived is None else max(0.0, time.monotonic() - arrived)
        refusal = self.admission.refusal(count, waited)
        if refusal is not None:
            self.metrics.refused.labels(str(refusal.status)).inc()
            raise APIError(
                refusal.message,
                status=refusal.status,
                headers={"Retry-After": str(refusal.retry_after)},
            )
        self.admission.enter(count)
        try:
            yield
        finally:
            self.admission.leave(count)

    async def drain(self, timeout: float) -> None:
        """Stop admitting; let running requests finish for up to ``timeout`` seconds, then end
        the rest with a 503 error (streams: an error event, then [DONE])."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.admission.admitted and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._queues:
            logger.warning("shutdown timeout: ending %d running request(s)", len(self._queues))
        for q in list(self._queues.values()):
            q.put_nowait(("error", 503, "the server is shutting down"))
        flush_deadline = time.monotonic() + 5  # let those errors reach their clients
        while self.admission.admitted and time.monotonic() < flush_deadline:
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ messages
    async def _recv_loop(self) -> None:
        while True:
            msg = await self._recv.recv_pyobj()
            self.last_message = time.monotonic()
            op = msg.get("op")
            if op == "batch":
                route_batch(msg, self._texts, self._queues, self.metrics, self.last_message)
            elif op == "out":
                self.metrics.on_output(msg["rid"], msg["out"], msg["finished"], time.monotonic())
                q = self._queues.get(msg["rid"])
                if q is not None:
                    q.put_nowait(("out", msg["out"], msg["finished"]))
            elif op == "error":
                q = self._queues.get(msg["rid"])
                if q is not None:
                    q.put_nowait(("error", msg["status"], msg["message"]))
            elif op == "reply":
                fut = self._replies.pop(msg["req_id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg["result"])

    def _require_alive(self) -> None:
        if not self.is_alive():
            raise APIError("the scheduler process is not running", status=503)

    def _post(self, msg: Any) -> bool:
        """Send without blocking: a PUSH socket whose peer is gone would block forever, and
        this runs on the event loop. False means the scheduler process is unreachable."""
        try:
            self._send.send_pyobj(msg, flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    async def _call(
        self, message: type[FlushCacheReq] | type[GetInfoReq], timeout: float = 60.0
    ) -> Any:
        self._require_alive()
        req_id = next(self._req_ids)
        fut = asyncio.get_running_loop().create_future()
        self._replies[req_id] = fut
        if not self._post(message(req_id=req_id)):
            raise APIError("the scheduler process is not reachable", status=503)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._replies.pop(req_id, None)

    async def lora(self, lora_name: str, lora_path: str | None) -> dict[str, Any]:
        """Load (a path) or unload (None) an adapter in the scheduler process."""
        self._require_alive()
        req_id = next(self._req_ids)
        fut = asyncio.get_running_loop().create_future()
        self._replies[req_id] = fut
        if not self._post(LoraReq(req_id=req_id, lora_name=lora_name, lora_path=lora_path)):
            raise APIError("the scheduler process is not reachable", status=503)
        try:
            return await asyncio.wait_for(fut, 120.0)
        finally:
            self._replies.pop(req_id, None)

    async def flush_cache(self) -> Any:
        return await self._call(FlushCacheReq)

    async def server_info(self) -> dict[str, Any]:
        return await self._call(GetInfoReq, timeout=10.0)

    def abort(self, rid: str) -> None:
        if self._send is not None and self.is_alive():
            self._post(AbortReq(rid))

    def running_rids(self) -> list[str]:
        return list(self._queues)

    @property
    def _admission_limit(self) -> int:
        return self.admission.limit

    @property
    def limits(self) -> RequestLimits:
        """What the engine accepts, plus the server's bounds on one request's work
        (docs/reliability.md), for checking requests here before they are sent."""
        return RequestLimits(
            context_len=self.context_length,
            vocab_size=self.vocab_size,
            max_top_logprobs=MAX_TOP_LOGPROBS,
            max_sequences=min(MAX_SEQUENCES, self._admission_limit),
        )

    async def generate(self, req: GenerateReq) -> AsyncIterator[dict[str, Any]]:
        """Yield the request's cumulative outputs; the last one is finished. ``req`` is one
        sample (``n == 1``) with its rid. Leaving the loop early (client gone, task
        cancelled) aborts the request in the engine."""
        self._require_alive()
        if req.rid in self._queues:
            raise APIError(f"rid {req.rid!r} is already running", param="rid")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[req.rid] = q
        self._texts[req.rid] = StreamText(req, self.tokenizer)
        self.metrics.start(req.rid)
        finished = False
        try:
            if not self._post(req):
                finished = True
                raise APIError("the scheduler process is not reachable", status=503)
            self.admission.posted(req.rid, ARRIVAL.get())
            timeout = self.args.request_timeout
            deadline = None if timeout is None else time.monotonic() + timeout
            text, interval, sent = self._texts[req.rid], self.args.stream_interval, 0
            while not finished:
                item = await latest_item(q, deadline, timeout)
                if item[0] == "error":
                    finished = True
                    _, status, message = item
                    self.metrics.finish(req.rid, "error")
                    raise APIError(message, status=status)
                self.admission.started(req.rid)
                if item[0] == "ids":
                    text.pending = False
                    if not req.stream or (sent and len(text.ids) - sent < interval):
                        continue
                    out = text.output()
                else:
                    _, out, finished = item
                    tokens = (out.get("meta_info") or {}).get("completion_tokens") or 0
                    if not finished and (not req.stream or (sent and tokens - sent < interval)):
                        continue
                sent = max(1, (out.get("meta_info") or {}).get("completion_tokens") or 0)
                yield out
        finally:
            self.admission.ended(req.rid, finished)
            self._queues.pop(req.rid, None)
            self._texts.pop(req.rid, None)
            if not finished:  # client gone, timeout or shutdown: free its KV, count the abort
                self.metrics.finish(req.rid, "abort")
                self.abort(req.rid)


IPC_PREFIX = "plait-ipc-"


def remove_stale_ipc_dirs() -> list[str]:
    """Remove ``plait-ipc-<pid>-*`` directories in the temp dir whose owner pid is dead (a
    kill -9'd server runs no cleanup). Returns the removed paths."""
    removed = []
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        if not name.startswith(IPC_PREFIX):
            continue
        pid_text = name[len(IPC_PREFIX) :].split("-", 1)[0]
        path = os.path.join(tmp, name)
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
