"""The ``SglangScheduler`` RPCs on an :class:`EngineClient`.

What holds:
- ``Generate`` admits, checks and runs a request exactly as the HTTP routes do (the same
  ``EngineClient``, the core's rules, the same limits); an :class:`APIError` ends the call with
  the matching status (``convert.status_code``) and a message naming the field; an admission
  refusal (RESOURCE_EXHAUSTED for the count limit, UNAVAILABLE for the queue-time bound)
  carries the HTTP ``Retry-After`` seconds as ``retry-after`` trailing metadata. A call the
  gateway cancels (its client left) aborts the request in the engine, freeing its KV.
- ``Abort`` aborts the request id and the per-sample ids derived from it (``rid-i``).
- ``HealthCheck`` is a one-token generation through the whole pipeline, unhealthy while
  draining, like HTTP ``/health_generate``.
- ``GetModelInfo``/``GetServerInfo``/``GetLoads``/``FlushCache``/``GetTokenizer`` report what
  the gateway reads at registration and while routing. The RPCs a Plait worker has no use for
  (embeddings, profiling, LoRA, KV events) answer UNIMPLEMENTED, the generated default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator

import grpc
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

import plait
from plait.core.messages import GenerateReq
from plait.server.engine_client import EngineClient
from plait.server.grpc import convert
from plait.server.grpc.model_facts import model_facts, tokenizer_zip
from plait.server.protocol import APIError
from plait.server.submit import collect, invalid_request, merge_streams, prepare

logger = logging.getLogger("plait.grpc")

_CHUNK_BYTES = 1 << 20
_PROBE_TIMEOUT = 30.0


class SchedulerServicer(pb_grpc.SglangSchedulerServicer):
    def __init__(self, client: EngineClient, server_args: dict[str, Any]):
        self.client = client
        self.server_args = server_args
        self.facts = model_facts(client.model_path, client.tokenizer)

    # ------------------------------------------------------------------ generation
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            reqs = await self._prepare(request)
            if request.stream:
                async for response in self._stream(request.request_id, reqs):
                    yield response
            else:
                outs = await collect(self.client, reqs, None)
                for i, out in enumerate(outs):
                    yield convert.complete(request.request_id, out, 0, i)
        except APIError as e:
            if e.status >= 500:
                logger.warning("request %s failed: %s", request.request_id, e.message)
            await context.abort(
                convert.status_code(e), convert.error_message(e), convert.retry_metadata(e)
            )

    async def _prepare(self, request: pb.GenerateRequest) -> list[GenerateReq]:
        with invalid_request():
            msg = convert.generate_req(request)
            return await prepare(self.client, [msg])

    async def _stream(
        self, rid: str, reqs: list[GenerateReq]
    ) -> AsyncIterator[pb.GenerateResponse]:
        sent = [0] * len(reqs)
        async with contextlib.aclosing(merge_streams(self.client, reqs)) as stream:
            async for i, out in stream:
                before, sent[i] = sent[i], len(out.get("output_ids") or [])
                yield convert.chunk(rid, out, before, i)
                if out.get("meta_info", {}).get("finish_reason") is not None:
                    yield convert.complete(rid, out, before, i)

    async def Abort(self, request: pb.AbortRequest, context: Any) -> pb.AbortResponse:
        rid = request.request_id
        rids = [r for r in self.client.running_rids() if r == rid or r.startswith(rid + "-")]
        for r in rids:
            self.client.abort(r)
        return pb.AbortResponse(
            success=bool(rids), message=f"aborted {len(rids)} request(s)" if rids else "not found"
        )

    # ------------------------------------------------------------------ health and info
    async def HealthCheck(self, request: Any, context: Any) -> pb.HealthCheckResponse:
        """A one-token generation through the whole pipeline; as in SGLang's servicer, any
        message from the scheduler process after the probe started also counts, so a worker
        busy with a long batch answers at once instead of after its queue."""
        c = self.client
        if c.draining or not c.is_alive():
            return pb.HealthCheckResponse(healthy=False, message="draining or not running")
        started = time.monotonic()
        probe = GenerateReq(
            input_ids=[self.facts.probe_token],
            sampling_params={"max_new_tokens": 1, "temperature": 0},
        ).expand()[0]
        task = asyncio.create_task(collect(c, [probe], None))
        try:
            while time.monotonic() - started < _PROBE_TIMEOUT:
                if task.done():
                    task.result()
                    return pb.HealthCheckResponse(healthy=True, message="ok")
                if c.last_message > started:
                    return pb.HealthCheckResponse(healthy=True, message="scheduler active")
                await asyncio.sleep(0.02)
        except APIError as e:
            return pb.HealthCheckResponse(healthy=False, message=f"probe failed: {e}")
        finally:
            task.cancel()  # aborts the probe in the engine if it is still running
            await asyncio.gather(task, return_exceptions=True)
        return pb.HealthCheckResponse(healthy=False, message="the engine did not answer")

    async def GetModelInfo(self, request: Any, context: Any) -> pb.GetModelInfoResponse:
        c, f = self.client, self.facts
        return pb.GetModelInfoResponse(
            model_path=c.model_path,
            tokenizer_path=c.model_path,
            is_generation=True,
            served_model_name=c.model_name,
            max_context_length=c.context_length or 0,
            vocab_size=c.vocab_size or 0,
            model_type=f.model_type,
            architectures=f.architectures,
            eos_token_ids=f.eos_token_ids,
            pad_token_id=f.pad_token_id,
            bos_token_id=f.bos_token_id,
            max_req_input_len=max((c.context_length or 1) - 1, 0),
        )

    async def GetServerInfo(self, request: Any, context: Any) -> pb.GetServerInfoResponse:
        c = self.client
        engine = await self._engine_info(context)
        args, sched = Struct(), Struct()
        args.update({k: v for k, v in self.server_args.items() if _plain(v)})
        sched.update({k: v for k, v in engine.items() if _plain(v)})
        started = Timestamp()
        started.FromSeconds(int(c.started_at))
        return pb.GetServerInfoResponse(
            server_args=args,
            scheduler_info=sched,
            active_requests=len(c.running_rids()),
            is_paused=c.draining,
            uptime_seconds=time.time() - c.started_at,
            sglang_version=f"plait-{plait.__version__}",
            server_type="grpc",
            start_time=started,
            max_total_num_tokens=int(engine.get("max_total_tokens") or 0),
        )

    async def GetLoads(self, request: pb.GetLoadsRequest, context: Any) -> pb.GetLoadsResponse:
        e = await self._engine_info(context)
        running, waiting = e.get("num_running_reqs", 0), e.get("num_waiting_reqs", 0)
        total = int(e.get("max_total_tokens") or 0)
        used = total - int(e.get("available_kv_tokens") or 0)
        load = pb.SchedulerLoad(
            dp_rank=0,
            num_running_reqs=running,
            num_waiting_reqs=waiting,
            num_total_reqs=running + waiting,
            num_used_tokens=used,
            max_total_num_tokens=total,
            token_usage=used / total if total else 0.0,
            max_running_requests=self.client.args.max_running_requests,
        )
        return pb.GetLoadsResponse(
            timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            version=f"plait-{plait.__version__}",
            dp_rank_count=1,
            loads=[load],
            aggregate=pb.AggregateMetrics(
                total_running_reqs=running, total_waiting_reqs=waiting, total_reqs=running + waiting
            ),
        )

    async def FlushCache(self, request: Any, context: Any) -> common_pb2.FlushCacheResponse:
        ok = await self.client.flush_cache()
        if ok is False or (isinstance(ok, dict) and "error" in ok):
            return common_pb2.FlushCacheResponse(
                success=False, message="cache not flushed: requests are still running"
            )
        return common_pb2.FlushCacheResponse(success=True, message="Cache flushed.")

    async def GetTokenizer(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        try:
            data, digest = await asyncio.to_thread(tokenizer_zip, self.client.model_path)
        except FileNotFoundError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        for start in range(0, len(data), _CHUNK_BYTES):
            last = start + _CHUNK_BYTES >= len(data)
            yield common_pb2.GetTokenizerChunk(
                data=data[start : start + _CHUNK_BYTES], sha256=digest if last else ""
            )

    async def SubscribeKvEvents(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Not offered: the gateway then polls ``GetLoads`` and routes cache-aware on its own
        prefix tree."""
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "Plait workers do not publish KV cache events"
        )

    async def _engine_info(self, context: grpc.aio.ServicerContext) -> dict[str, Any]:
        try:
            return await self.client.server_info()
        except (APIError, asyncio.TimeoutError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine not answering: {e}")
            raise  # abort raises; this keeps type checkers sure of it


def _plain(value: Any) -> bool:
    """Whether a protobuf Struct holds ``value`` as is (JSON scalars and lists of them)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))
