"""benchmarks/serving/raw_http.py, the overload benchmark's cheap client, against a small
asyncio HTTP server: Content-Length and chunked bodies, kept-alive connections reused, and a
reused connection the server closed meanwhile retried on a new one."""

from __future__ import annotations

import asyncio

from benchmarks.serving.raw_http import RawHTTP


async def _serve(answers: list[bytes], connections: list[int], requests: list[bytes]):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while answers:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            requests.append(head + await reader.readexactly(length))
            answer = answers.pop(0)
            writer.write(answer)
            await writer.drain()
            if b"connection: close" in answer.lower():
                break
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_bodies_keep_alive_and_a_closed_idle_connection():
    answers = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 2\r\ncontent-length: 3\r\n\r\n{x}",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\n\r\n",
    ]
    connections: list[int] = []
    seen: list[bytes] = []

    async def run() -> list[tuple[int, dict[str, str], bytes]]:
        server = await _serve(answers, connections, seen)
        client = RawHTTP("127.0.0.1", server.sockets[0].getsockname()[1])
        out = [await client.post("/generate", b'{"a": 1}') for _ in range(4)]
        server.close()
        await client.close()
        return out

    out = asyncio.run(run())
    assert [(status, body) for status, _, body in out] == [
        (200, b"{}"),
        (503, b"{x}"),
        (200, b"abcde"),
        (429, b""),
    ]
    assert out[1][1]["retry-after"] == "2"
    # one connection for the first three (kept alive), a new one after "connection: close"
    assert len(connections) == 2
    assert all(r.startswith(b"POST /generate HTTP/1.1\r\n") for r in seen)
    assert all(r.endswith(b'\r\n\r\n{"a": 1}') for r in seen)


def test_a_reused_connection_the_server_closed_is_retried_once():
    answers = [b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"] * 2
    connections: list[int] = []

    async def run() -> list[tuple[int, dict[str, str], bytes]]:
        server = await _serve(answers, connections, [])
        client = RawHTTP("127.0.0.1", server.sockets[0].getsockname()[1])
        first = await client.post("/x", b"{}")
        # the server drops the idle connection (a keep-alive timeout)
        client._idle[0][1].transport.abort()
        second = await client.post("/x", b"{}")
        server.close()
        await client.close()
        return [first, second]

    assert [(status, body) for status, _, body in asyncio.run(run())] == [(200, b"a")] * 2
    assert len(connections) == 2
