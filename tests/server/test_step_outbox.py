"""The served host path's hand-off (issue 41): a step's outputs leave the scheduler process in
one message carrying only new ids for lite requests, and the HTTP process rebuilds the same
cumulative outputs, detokenizing them itself."""

from __future__ import annotations

import asyncio
from typing import Any

from plait.core.finish_reason import FinishReason
from plait.core.messages import GenerateReq
from plait.core.request import Req
from plait.core.request_output import RequestFinisher
from plait.core.sampling_params import SamplingParams
from plait.models.default import default_model_path
from plait.server.metrics import ServerMetrics
from plait.server.step_outbox import StepOutbox
from plait.server.stream_text import IDS, StreamText, route_batch


class _Loop:
    """Records ``call_soon_threadsafe`` wake-ups instead of running them."""

    def __init__(self) -> None:
        self.wakes: list[Any] = []

    def call_soon_threadsafe(self, fn: Any) -> None:
        self.wakes.append(fn)


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path())


def _req(rid: str, **sampling: Any) -> Req:
    return Req(rid=rid, input_ids=[1, 2, 3], sampling=SamplingParams(**sampling))


def test_a_steps_outputs_leave_in_one_message_with_only_the_new_ids() -> None:
    loop, sent, finished = _Loop(), [], []
    box = StepOutbox(loop, sent.append, finished.append)  # type: ignore[arg-type]
    lite, stops = _req("a"), _req("b", stop=["x"])
    box.prepare([lite, stops], client_streams=True)
    assert lite.detokenize_later and not stops.detokenize_later and lite.stream
    for step in range(2):
        for req in (lite, stops):
            req.output_ids.append(100 + step)
            box.on_output(req, False)
    assert len(loop.wakes) == 1  # one wake-up for everything queued before the flush
    loop.wakes.pop()()
    assert len(sent) == 1 and sent[0]["op"] == "batch" and not sent[0]["errors"]
    outs = sent[0]["outs"]
    assert [(o[0], o[2]) for o in outs if o[3] is None] == [("a", [100]), ("a", [101])]
    full = [o[3] for o in outs if o[0] == "b"]
    assert [o["output_ids"] for o in full] == [[100], [100, 101]]
    lite.output_ids.append(102)
    lite.finish(FinishReason.length(3))
    box.on_output(lite, True)
    failed = _req("c")
    box.prepare([failed], client_streams=False)
    failed.finish(FinishReason.error("boom"))
    box.on_output(failed, True)
    loop.wakes.pop()()
    last = sent[1]
    assert [o[0] for o in last["outs"]] == ["a"] and last["outs"][0][3]["output_ids"] == [
        100,
        101,
        102,
    ]
    assert last["errors"] == [("c", 500, "engine error: boom")]
    assert finished == ["a", "c"]


def test_the_http_side_rebuilds_the_text_the_engine_would_stream() -> None:
    tok = _tokenizer()
    ids = tok.encode(" naïve café — 日本語 text, streamed token by token")
    msg = GenerateReq(input_ids=[1, 2], rid="r", stream=True)
    text = StreamText(msg, tok)
    finisher = RequestFinisher(tok, set())
    engine_side = _req("r")
    engine_side.stream = True
    outs = []
    for i, t in enumerate(ids):
        finisher.append_token(engine_side, t, 1000)
        outs.append(text.advance([t], 2, 0))
        assert outs[-1]["text"] == engine_side.text  # what the engine itself would stream
        assert outs[-1]["output_ids"] == ids[: i + 1]
    assert outs[-1]["meta_info"]["completion_tokens"] == len(ids)
    quiet = StreamText(GenerateReq(input_ids=[1], rid="q"), tok)  # a client that does not stream
    assert quiet.advance(ids[:3], 1, 0)["text"] == "" and quiet.detok is None


def test_a_lite_request_is_not_detokenized_on_the_scheduler_thread() -> None:
    tok = _tokenizer()
    finisher = RequestFinisher(tok, set())
    ids = tok.encode(" hello there, wide world")
    req = _req("r", max_new_tokens=len(ids))
    req.stream, req.detokenize_later = True, True
    for t in ids[:-1]:
        finisher.append_token(req, t, 1000)
    assert req.detok is None and req.text == ""
    finisher.append_token(req, ids[-1], 1000)
    assert req.finished and req.text == tok.decode(ids)


def test_route_batch_queues_outputs_and_errors_per_request() -> None:
    tok = _tokenizer()
    ids = tok.encode(" one two")
    texts = {"r": StreamText(GenerateReq(input_ids=[1], rid="r", stream=True), tok)}
    queues: dict[str, asyncio.Queue] = {"r": asyncio.Queue(), "e": asyncio.Queue()}
    metrics = ServerMetrics()
    metrics.start("r")
    final = {"text": "x", "output_ids": ids, "meta_info": {"completion_tokens": len(ids)}}
    msg = {
        "op": "batch",
        "outs": [("r", False, ids, None, 1, 0), ("gone", False, [5], None, 1, 0)],
        "errors": [("e", 500, "engine error: boom")],
    }
    route_batch(msg, texts, queues, metrics, 1.0)
    route_batch({"outs": [("r", True, None, final, 0, 0)], "errors": []}, texts, queues, metrics, 2)
    got = [queues["r"].get_nowait(), queues["r"].get_nowait()]
    assert got[0] == IDS and texts["r"].output()["text"] == tok.decode(ids)
    assert got[1] == ("out", final, True)
    assert queues["e"].get_nowait() == ("error", 500, "engine error: boom")
