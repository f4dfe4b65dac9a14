"""The admission rule's answers on the routes besides the gated HTTP ones (issue 42 item 2):
``/health_generate`` and the gRPC ``Generate`` refuse with a clear status and the same retry
hint (``Retry-After`` header; ``retry-after`` trailing metadata)."""

from __future__ import annotations

import asyncio
import time

import grpc
import requests
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from plait.server.grpc.servicer import SchedulerServicer
from plait.server.protocol import APIError
from tests.server.conftest import FAKE, start_server


def test_health_generate_refused_at_admission_says_why_and_when_to_retry(tiny_model_dir, tmp_path):
    """One place and no queue: while a request holds it, the health probe cannot be admitted.
    It answers the refusal's status, message and ``Retry-After`` (it answered a bare 503)."""
    server = start_server(
        [*FAKE, "--max-running-requests", "1", "--max-queued-requests", "0"],
        tmp_path / "health.log",
        str(tiny_model_dir),
        env={"FAKE_ENGINE_TOKEN_DELAY": "0.05"},
        timeout=120,
    )
    try:
        holder = requests.post(  # a stream holds the one place until it is closed
            server.url + "/generate",
            json={"text": "x", "stream": True, "sampling_params": {"max_new_tokens": 400}},
            stream=True,
            timeout=60,
        )
        assert holder.status_code == 200
        lines = holder.iter_lines()  # kept: a discarded one closes the connection
        next(lines)  # it runs
        r = requests.get(server.url + "/health_generate", timeout=30)
        assert r.status_code == 429, r.text
        assert r.headers["Retry-After"] == "1"
        assert "too many requests in flight" in r.text
        holder.close()  # the client leaves: the request is aborted, its place freed
        for _ in range(50):
            if requests.get(server.url + "/health_generate", timeout=30).status_code == 200:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("/health_generate stayed refused after the place was freed")
    finally:
        server.stop()


class _Context:
    """What ``Generate`` does with a gRPC servicer context: it aborts with a status."""

    def __init__(self) -> None:
        self.aborted: tuple | None = None

    async def abort(self, code, details="", trailing_metadata=()) -> None:
        self.aborted = (code, details, tuple(trailing_metadata))
        raise grpc.RpcError()  # as grpc.aio's abort: it ends the call


def test_grpc_generate_refused_at_admission_carries_retry_after():
    servicer = object.__new__(SchedulerServicer)  # no engine: refused before it

    async def refuse(request):
        raise APIError("the server is overloaded", status=503, headers={"Retry-After": "7"})

    servicer._prepare = refuse
    context = _Context()

    async def call() -> None:
        try:
            async for _ in servicer.Generate(pb.GenerateRequest(request_id="r"), context):
                pass
        except grpc.RpcError:
            pass

    asyncio.run(call())
    assert context.aborted == (
        grpc.StatusCode.UNAVAILABLE,
        "the server is overloaded",
        (("retry-after", "7"),),
    )
