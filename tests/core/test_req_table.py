"""The scheduler's request table and the finish reasons it reports: where a request is, how it
leaves, and the wire format every finish keeps."""

from __future__ import annotations

import pytest

from plait.core.finish_reason import FinishReason
from plait.core.req_table import ReqTable
from plait.core.request import Req
from plait.core.sampling_params import SamplingParams


def make(rid: str) -> Req:
    return Req(rid=rid, input_ids=[1, 2, 3], sampling=SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize(
    "reason, wire",
    [
        (FinishReason.stop(7), {"type": "stop", "matched": 7}),
        (FinishReason.stop("</s>"), {"type": "stop", "matched": "</s>"}),
        (FinishReason.stop(None), {"type": "stop", "matched": None}),
        (FinishReason.length(5), {"type": "length", "length": 5}),
        (FinishReason.abort("aborted"), {"type": "abort", "message": "aborted"}),
        (FinishReason.error("boom"), {"type": "error", "message": "boom"}),
    ],
)
def test_each_finish_reason_keeps_its_wire_format(reason, wire):
    req = make("a")
    assert req.finish_reason is None and not req.finished
    req.finish(reason)
    assert req.finished and req.finish_reason == wire


def test_the_first_finish_reason_wins():
    req = make("a")
    req.finish(FinishReason.length(2))
    req.finish(FinishReason.abort("late"))
    assert req.finish_reason == {"type": "length", "length": 2}


def test_find_looks_everywhere_and_skips_finished_requests():
    table = ReqTable()
    w, r, c = make("w"), make("r"), make("c")
    table.waiting.append(w)
    table.running.append(r)
    table.chunked = c
    assert [table.find(x) for x in ("w", "r", "c", "nope")] == [w, r, c, None]
    r.finish(FinishReason.length(2))
    assert table.find("r") is None
    assert list(table) == [w, r, c] and table.has_work()


def test_remove_and_requeue_keep_a_request_in_one_place():
    table = ReqTable()
    a, b = make("a"), make("b")
    table.waiting.append(a)
    table.running.append(b)
    table.chunked = a  # never both in practice; remove clears every place anyway
    table.remove(a)
    assert table.waiting == [] and table.chunked is None
    table.requeue(b)
    assert table.running == [] and table.waiting == [b]
    table.remove(b)
    assert not table.holds_requests() and not table.has_work()
