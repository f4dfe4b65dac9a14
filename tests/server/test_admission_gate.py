"""The admission gate (issue 42): an overloaded server refuses generation requests from their
head, before reading or parsing the body, with a pre-encoded body and ``Retry-After``; the
requests it lets through carry their arrival time."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import requests

from plait.server.admission import ARRIVAL, MIN_SAMPLES, AdmissionControl
from plait.server.admission_gate import BODIES, AdmissionGateMiddleware
from plait.server.metrics import ServerMetrics
from tests.server.conftest import FAKE, start_server


class _App:
    """The inner ASGI app: records whether it was reached and the arrival it saw."""

    def __init__(self) -> None:
        self.arrivals: list[float | None] = []

    async def __call__(self, scope: dict, receive, send) -> None:
        self.arrivals.append(ARRIVAL.get())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def _overloaded_client() -> SimpleNamespace:
    """An engine client whose admission predicts a 5 s wait against a 1 s bound."""
    admission = AdmissionControl(running_slots=4, max_queued=100, max_queue_time=1.0)
    now = time.monotonic()
    admission._finishes.extend(now - 1.0 + i / 10 for i in range(MIN_SAMPLES + 2))  # ~10/s
    admission.enter(4 + 50)
    return SimpleNamespace(admission=admission, draining=False, metrics=ServerMetrics())


def _call(gate: AdmissionGateMiddleware, client: SimpleNamespace, path: str) -> list[dict]:
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [],
        "app": SimpleNamespace(state=SimpleNamespace(client=client)),
    }
    sent: list[dict] = []

    async def receive() -> dict:
        raise AssertionError("the gate must not read the body of a request it refuses")

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(gate(scope, receive, send))
    return sent


def test_an_overloaded_gate_refuses_without_reading_the_body():
    inner = _App()
    client = _overloaded_client()
    sent = _call(AdmissionGateMiddleware(inner), client, "/v1/chat/completions")
    assert inner.arrivals == []  # neither the routes nor the body parser ran
    start, body = sent
    headers = dict(start["headers"])
    assert start["status"] == 503
    assert int(headers[b"retry-after"]) >= 1
    assert body["body"] is BODIES[503]  # encoded once, not per refusal
    assert json.loads(body["body"])["error"]["code"] == 503
    assert (
        'plait_requests_refused_total{status="503"} 1.0'
        in client.metrics.render(None, 0)[0].decode()
    )


def test_the_gate_stamps_the_arrival_of_what_it_lets_through():
    inner = _App()
    client = _overloaded_client()
    client.admission.leave(50)  # 4 running, none queued: the next one runs at once
    before = time.monotonic()
    sent = _call(AdmissionGateMiddleware(inner), client, "/generate")
    assert sent[0]["status"] == 200
    assert len(inner.arrivals) == 1 and before <= inner.arrivals[0] <= time.monotonic()
    assert ARRIVAL.get() is None  # reset after the request


def test_other_routes_pass_the_gate():
    inner = _App()
    sent = _call(AdmissionGateMiddleware(inner), _overloaded_client(), "/flush_cache")
    assert sent[0]["status"] == 200 and inner.arrivals == [None]


def test_a_full_server_refuses_an_unparsed_body_with_429(tiny_model_dir, tmp_path):
    """One running place, no queue: while it is taken, a request whose body is not even JSON
    gets the count limit's 429 with Retry-After (it would be a 400 if the body were parsed
    first), and the server still answers once the place is free."""
    server = start_server(
        [*FAKE, "--max-running-requests", "1", "--max-queued-requests", "0"],
        tmp_path / "gate.log",
        str(tiny_model_dir),
        env={"FAKE_ENGINE_TOKEN_DELAY": "0.5"},
        timeout=120,
    )
    url = server.url + "/generate"
    try:
        with requests.Session() as s:
            long = s.post(  # a stream holds the place while we read its first event
                url,
                json={"text": "a", "sampling_params": {"max_new_tokens": 100}, "stream": True},
                stream=True,
                timeout=60,
            )
            lines = long.iter_lines()  # held: a dropped iterator closes the connection
            next(lines)
            with requests.Session() as other:
                r = other.post(url, data=b"not json", timeout=10)
                assert r.status_code == 429, r.text
                assert r.headers["Retry-After"] == "1"
                assert r.json()["error"]["code"] == 429
                # the connection stays usable after a refusal whose body was never read
                r = other.post(url, data=b"not json", timeout=10)
                assert r.status_code == 429, r.text
            long.close()
        deadline = time.monotonic() + 30  # the abort of the closed stream frees the place
        while True:
            ok = requests.post(
                url, json={"text": "b", "sampling_params": {"max_new_tokens": 2}}, timeout=60
            )
            if ok.status_code != 429 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert ok.status_code == 200, ok.text
    finally:
        server.stop()
