"""Issue 42, items 1 and 5, against a real ``plait serve`` (fake engine) with short limits:
silent and trickling connections get 408 and are closed, oversized heads and too many header
fields get 431 (a status the client reads, not a reset), and a stream whose client stopped
reading is cut and its request aborted (KV freed) instead of generating to the end.

Each case then checks a normal request still succeeds: the limits cut one connection only."""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from tests.server.conftest import FAKE, start_server
from tests.server.test_server_fake import wait_until_idle

LIMITS = [
    "--header-read-timeout",
    "1",
    "--body-read-timeout",
    "1",
    "--stream-stall-timeout",
    "1",
    "--max-header-count",
    "50",
    "--keep-alive-timeout",
    "2",
]


@pytest.fixture(scope="module")
def limited_server(tiny_model_dir, tmp_path_factory):
    server = start_server(
        [*FAKE, *LIMITS],
        tmp_path_factory.mktemp("logs") / "limits.log",
        str(tiny_model_dir),
        env={"FAKE_ENGINE_TOKEN_DELAY": "0.15"},
        timeout=120,
    )
    yield server
    server.stop()


def _connect(server, rcvbuf: int | None = None) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    sock.settimeout(10)
    return sock


def _read_status(sock: socket.socket) -> tuple[int, float]:
    """The response's status code and when it arrived; then the server closes (EOF)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed without a response (got {data!r})"
        data += chunk
    at = time.monotonic()
    while sock.recv(4096):
        pass  # the server closes after its response
    return int(data.split(b" ", 2)[1]), at


def _wait_running(server, timeout: float = 10) -> None:
    """Until the server runs a request (so a later idle server means it ended)."""
    deadline = time.monotonic() + timeout
    while server.get("/get_server_info").json()["num_running_reqs"] == 0:
        assert time.monotonic() < deadline, "the streamed request never started"
        time.sleep(0.05)


def _still_serves(server) -> None:
    r = server.post("/generate", json={"text": "ok", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200, r.text


def test_a_silent_connection_gets_408_and_is_closed(limited_server):
    start = time.monotonic()
    with _connect(limited_server) as sock:
        status, at = _read_status(sock)
    assert status == 408
    assert 0.8 < at - start < 5
    _still_serves(limited_server)


def test_a_trickled_head_gets_408_whatever_the_byte_rate(limited_server):
    start = time.monotonic()
    with _connect(limited_server) as sock:
        for b in b"POST /generate HTTP/1.1\r\nHost: x\r\n":
            try:
                sock.sendall(bytes([b]))
            except OSError:
                break
            time.sleep(0.1)
            if time.monotonic() - start > 3:
                break
        status, _ = _read_status(sock)
    assert status == 408
    _still_serves(limited_server)


def test_a_trickled_body_gets_408(limited_server):
    with _connect(limited_server) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"text": '
        )
        status, _ = _read_status(sock)
    assert status == 408
    _still_serves(limited_server)


def test_an_idle_kept_alive_connection_is_closed_after_its_timeout(limited_server):
    """After a full answer the connection idles between requests: it is closed after
    ``--keep-alive-timeout`` (2 s here; the 5 s default, or no limit, fails the bound), with
    nothing sent after the answer (the 1 s header timeout is not what closes it)."""
    with _connect(limited_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        answered = time.monotonic()
        rest = data.split(b"\r\n\r\n", 1)[1]
        while chunk := sock.recv(4096):
            rest += chunk
        closed = time.monotonic()
    assert data.startswith(b"HTTP/1.1 200"), data
    assert b"HTTP/1.1" not in rest, rest  # no second answer (a 408) on the idle connection
    assert 1.5 < closed - answered < 4
    _still_serves(limited_server)


def test_a_kept_alive_connections_next_head_has_the_header_timeout(limited_server):
    """The next request's head on a kept-alive connection is timed from its first byte: an
    incomplete one gets 408 after ``--header-read-timeout`` (1 s)."""
    with _connect(limited_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        assert data.startswith(b"HTTP/1.1 200"), data
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # and nothing more
        sent = time.monotonic()
        while b"HTTP/1.1 408" not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    assert time.monotonic() - sent < 1.9  # the head's 1 s, not the 2 s keep-alive
    _still_serves(limited_server)


def test_a_one_megabyte_header_gets_431_not_a_reset(limited_server):
    with _connect(limited_server) as sock:
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2**20 + b"\r\n\r\n"
        try:
            sock.sendall(head)
        except OSError:
            pass  # the server may stop reading once it has refused; the status is still there
        status, _ = _read_status(sock)
    assert status == 431
    _still_serves(limited_server)


def test_too_many_header_fields_get_431(limited_server):
    headers = {f"X-Field-{i}": "1" for i in range(60)}
    r = requests.get(limited_server.url + "/health", headers=headers, timeout=10)
    assert r.status_code == 431
    assert "header fields" in r.json()["error"]["message"]
    ok = requests.get(limited_server.url + "/health", headers=dict(list(headers.items())[:20]))
    assert ok.status_code == 200
    _still_serves(limited_server)


def test_a_stream_whose_client_stopped_reading_is_cut_and_its_request_aborted(limited_server):
    # 400 tokens at 0.15 s each would run 60 s; every event repeats the growing text and its
    # logprobs (20 top logprobs a token, the most /generate allows: the buffers fill in about
    # half the time 5 take), so the socket buffers fill once the client stops reading.
    body = json.dumps(
        {
            "text": "stall " * 5,
            "stream": True,
            "return_logprob": True,
            "top_logprobs_num": 20,
            "sampling_params": {"max_new_tokens": 400, "ignore_eos": True},
        }
    ).encode()
    sock = _connect(limited_server, rcvbuf=4096)
    start = time.monotonic()
    try:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        _wait_running(limited_server)
        info = wait_until_idle(limited_server, timeout=40)
        assert info["num_running_reqs"] == 0, info
        assert time.monotonic() - start < 40  # the request runs 60 s if nobody cuts it
        assert info["available_kv_tokens"] + info["evictable_kv_tokens"] == info["max_total_tokens"]
    finally:
        sock.close()
    _still_serves(limited_server)
