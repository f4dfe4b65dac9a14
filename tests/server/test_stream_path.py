"""The served stream path (issue 41): a stream sends one HTTP chunk per wake of its handler --
what one step (or several, when the handler lagged) produced, coalesced -- and
``--stream-interval N`` sends every N tokens; the text and ids a stream ends with are the
non-stream answer's. A real ``plait serve`` of the null model (``plait/models/null.py``: real
engine, tokenizer and detokenizer, a forward that costs nothing)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import requests

from plait.core.messages import GenerateReq
from plait.models.null import make_null_checkpoint
from plait.server.engine_client import EngineClient
from plait.server.server_args import ServerArgs
from plait.server.stream_text import IDS, route_batch
from tests.server.conftest import start_server

INTERVAL = 4


@pytest.fixture(scope="module")
def null_server(tmp_path_factory, smollm_dir):
    model = make_null_checkpoint(tmp_path_factory.mktemp("null"), smollm_dir)
    tmp = tmp_path_factory.mktemp("logs")
    server = start_server(
        ["--device", "cpu", "--stream-interval", str(INTERVAL)], tmp / "null.log", str(model)
    )
    yield server
    server.stop()


def _chunks(server, path: str, body: dict) -> list[list]:
    """The stream's HTTP chunks (one per server send), each as its parsed events."""
    resp = requests.post(server.url + path, json=body, stream=True, timeout=120)
    assert resp.status_code == 200, resp.text
    out = []
    for chunk in resp.raw.read_chunked():
        events = [e for e in chunk.split(b"\n\n") if e]
        assert all(e.startswith(b"data: ") for e in events), chunk
        out.append([e[6:] if e == b"data: [DONE]" else json.loads(e[6:]) for e in events])
    return out


def test_generate_stream_every_interval_ends_with_the_answer(null_server):
    sp = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
    body = {"text": "The served path", "sampling_params": sp}
    whole = requests.post(null_server.url + "/generate", json=body, timeout=120).json()
    chunks = _chunks(null_server, "/generate", {**body, "stream": True})
    assert chunks[-1] == [b"[DONE]"]
    events = [e for c in chunks[:-1] for e in c]
    assert all(len(c) == 1 for c in chunks[:-1])  # one send per event
    counts = [e["meta_info"]["completion_tokens"] for e in events]
    # the first output at once (before an interval's worth of tokens: a handler that wakes a
    # step or two late coalesces them into it, latest wins), then every INTERVAL tokens or more,
    # and the finished output
    assert 1 <= counts[0] < INTERVAL and counts[-1] == 10
    assert all(b - a >= INTERVAL for a, b in zip(counts[:-2], counts[1:-1]))
    assert len(events) <= 1 + 9 // INTERVAL + 1
    assert events[-1]["text"] == whole["text"] and events[-1]["output_ids"] == whole["output_ids"]
    assert whole["text"] and len(whole["output_ids"]) == 10
    for e in events:  # every event's ids and text are a prefix of the answer's
        assert whole["output_ids"][: len(e["output_ids"])] == e["output_ids"]
        assert whole["text"].startswith(e["text"])


def test_chat_stream_coalesces_an_outputs_chunks_and_ends_with_the_answer(null_server):
    body = {
        "model": Path(null_server.model_path).name,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 9,
        "temperature": 0,
    }
    whole = requests.post(null_server.url + "/v1/chat/completions", json=body, timeout=120)
    answer = whole.json()["choices"][0]["message"]["content"]
    chunks = _chunks(null_server, "/v1/chat/completions", {**body, "stream": True})
    # the role chunk and the first token's delta come from one output: one send
    first = chunks[0]
    assert len(first) == 2 and first[0]["choices"][0]["delta"]["role"] == "assistant"
    assert first[1]["choices"][0]["delta"].get("content")
    deltas = [e["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] for e in c]
    assert "".join(deltas) == answer and answer
    assert len(chunks) - 1 <= 1 + 8 // INTERVAL + 1


def test_a_handler_that_lags_sends_one_output_for_several_steps(smollm_dir) -> None:
    """Three steps routed before the handler runs: one queue item, one cumulative output."""
    client = EngineClient(ServerArgs(), str(smollm_dir))
    from transformers import AutoTokenizer

    client.tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    client.proc = type("Alive", (), {"poll": lambda self: None})()
    client._recv_task = object()  # type: ignore[assignment]
    client._post = lambda msg: True  # type: ignore[method-assign]
    ids = client.tokenizer.encode(" one two three")
    req = GenerateReq(input_ids=[1, 2], rid="r", stream=True)

    async def run() -> list[dict]:
        gen = client.generate(req)
        first = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0)  # the handler now waits on its queue
        for t in ids:
            msg = {"outs": [("r", False, [t], None, 2, 0)], "errors": []}
            route_batch(msg, client._texts, client._queues, client.metrics, 1.0)
        assert list(client._queues["r"]._queue) == [IDS]  # type: ignore[attr-defined]
        out = await first
        await gen.aclose()
        return [out]

    try:
        (out,) = asyncio.run(run())
    finally:
        import shutil

        shutil.rmtree(client._ipc_dir, ignore_errors=True)
    assert out["output_ids"] == ids and out["text"] == client.tokenizer.decode(ids)
    assert out["meta_info"]["completion_tokens"] == len(ids)


def test_the_raw_benchmark_client_counts_events_and_tokens(null_server):
    """``benchmarks/serving/sse_client.py`` (host_path_served's load generator) reads the same
    tokens the server sent, and one event per send: first token, then every INTERVAL, end."""
    import argparse

    from benchmarks.serving import sse_client

    args = argparse.Namespace(
        dataset="random",
        num_prompts=3,
        input_len=8,
        output_len=9,
        range_ratio=0.0,
        prefix_len=0,
        num_groups=1,
        max_concurrency=3,
        seed=0,
        request_rate=float("inf"),
        warmup=False,
    )
    vocab = requests.get(null_server.url + "/get_model_info", timeout=30).json()["vocab_size"]
    run = sse_client.bench(null_server.url, args, vocab)
    assert run["completed"] == 3 and run["failed"] == 0
    assert run["output_tok_per_s"] * run["duration_s"] == pytest.approx(27)
    assert 2 <= run["events_per_stream"] <= 1 + 8 // INTERVAL + 1  # [1, 5, 9] when in time


def test_the_heap_left_by_startup_is_frozen_once_the_server_is_ready(monkeypatch, tmp_path):
    """The app's lifespan freezes the startup's objects (``settle_heap``), so the collector's
    full passes during serving do not walk the tokenizer and the imported modules."""
    import gc

    from plait.server import http_server

    async def started(self) -> None:
        self.tokenizer = object()

    async def stopped(self, timeout: float = 15.0) -> None:
        pass

    monkeypatch.setattr(EngineClient, "start", started)
    monkeypatch.setattr(EngineClient, "shutdown", stopped)
    app = http_server.create_app(ServerArgs(), str(tmp_path))
    gc.unfreeze()

    async def run() -> int:
        async with app.router.lifespan_context(app):
            return gc.get_freeze_count()

    try:
        frozen = asyncio.run(run())
    finally:
        gc.unfreeze()
        import shutil

        shutil.rmtree(app.state.client._ipc_dir, ignore_errors=True)
    assert frozen > 10_000  # at least the imported modules' objects
