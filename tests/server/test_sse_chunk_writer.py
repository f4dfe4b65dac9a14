"""Streamed bodies written past the ASGI send chain (issue 41): an ``SSEResponse`` whose scope
offers a ``ChunkWriter`` writes its chunks through it, and the head and the body's end through
``send``; the writer frames chunks as h11 would, honours flow control and writes nothing once
the client is gone. (Fakes of uvicorn's cycle: the real path runs in test_stream_path.py and
test_connection_limits.py, whose servers use it.)"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import h11

from plait.server.connection_guard import CHUNK_WRITER, ChunkWriter
from plait.server.sse import SSEResponse


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class _Flow:
    def __init__(self, paused: bool) -> None:
        self.write_paused, self.drained = paused, 0

    async def drain(self) -> None:
        self.drained += 1
        self.write_paused = False


def _cycle(paused: bool = False, version: bytes = b"1.1") -> SimpleNamespace:
    conn = SimpleNamespace(our_state=h11.SEND_BODY, their_http_version=version)
    return SimpleNamespace(
        transport=_Transport(),
        flow=_Flow(paused),
        disconnected=False,
        response_started=True,
        response_complete=False,
        conn=conn,
        scope={"method": "POST"},
    )


def test_the_writer_frames_chunks_waits_on_flow_control_and_stops_when_gone():
    cycle = _cycle(paused=True)
    writer = ChunkWriter(cycle)
    assert writer.usable()
    asyncio.run(writer.write(b"data: {}\n\n"))
    asyncio.run(writer.write(b""))  # an empty chunk would end the body: nothing is written
    assert cycle.flow.drained == 1
    assert cycle.transport.written == [b"a\r\ndata: {}\n\n\r\n"]
    cycle.disconnected = True
    asyncio.run(writer.write(b"late"))
    assert cycle.transport.written == [b"a\r\ndata: {}\n\n\r\n"]


def test_the_writer_is_not_used_for_an_http_1_0_client_or_outside_the_body():
    assert not ChunkWriter(_cycle(version=b"1.0")).usable()  # its body is read to the close
    ended = _cycle()
    ended.response_complete = True
    assert not ChunkWriter(ended).usable()


def test_an_sse_response_writes_its_chunks_through_the_offered_writer():
    cycle = _cycle()
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        await asyncio.sleep(3600)  # the client stays
        return {"type": "http.disconnect"}

    async def chunks():
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    scope = {"type": "http", "method": "POST", "extensions": {CHUNK_WRITER: ChunkWriter(cycle)}}
    asyncio.run(SSEResponse(chunks())(scope, receive, send))
    assert cycle.transport.written == [b"9\r\ndata: 1\n\n\r\n", b"9\r\ndata: 2\n\n\r\n"]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
