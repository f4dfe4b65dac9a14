"""A minimal HTTP/1.1 client on raw asyncio streams, for load generation that costs little CPU.

httpx spends about a millisecond of Python per request; at the ~50 requests a second of a 4x
overload on a 2-core machine that is CPU taken from the server under test. This client writes
a pre-built request and reads the status line, the headers and a ``Content-Length`` (or
chunked) body, reusing idle keep-alive connections. Enough for ``plait serve``'s JSON
answers; not a general client (no TLS, no redirects, no 1xx).
"""

from __future__ import annotations

import asyncio


class RawHTTP:
    """POSTs to ``host:port`` over a pool of kept-alive connections (one per request in
    flight; idle ones are reused)."""

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-cased names and values) and body of ``POST path``. A reused connection the server has closed
        meanwhile (keep-alive timeout) fails before the request was read: retried once on a
        new connection."""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        reused = bool(self._idle)
        conn = self._idle.pop() if reused else await self._connect()
        try:
            return await self._exchange(conn, head + body)
        except (ConnectionError, asyncio.IncompleteReadError):
            conn[1].close()
            if not reused:
                raise
        return await self._exchange(await self._connect(), head + body)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port, limit=1 << 22)

    async def _exchange(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        reader, writer = conn
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = await _read_chunked(reader)
        else:
            body = await reader.read()
            headers["connection"] = "close"
        if headers.get("connection") == "close":
            writer.close()
        else:
            self._idle.append(conn)
        return status, headers, body

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers from this server
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
