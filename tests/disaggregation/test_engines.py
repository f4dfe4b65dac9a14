"""A prefill engine and a decode engine in one process, KV moved by the fake transport: the
protocol, the scheduler hooks and the KV bookkeeping, without HTTP. Real processes, Mooncake and
the gateway are in ``test_pd_gateway.py``."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import zmq

import plait
from plait.core.messages import Bootstrap, GenerateReq, check_rooms
from plait.disaggregation.bootstrap import encode
from plait.server.data_parallel import free_port

PROMPTS = [
    "Hi",
    "The capital of France is",
    "def fib(n):\n    return " * 6,
    "Once upon a time, in a land far away, there lived " * 12,
]
SP = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
rooms = itertools.count(1)


@pytest.fixture(scope="module")
def engines(make_tiny_model):
    path = make_tiny_model()
    common = dict(
        model_path=path,
        max_total_tokens=4096,
        disaggregation_transfer_backend="fake",
        disaggregation_transfer_timeout=3.0,
    )
    port = free_port()
    unified = plait.Engine(model_path=path, max_total_tokens=4096)
    prefill = plait.Engine(
        disaggregation_mode="prefill", disaggregation_bootstrap_port=port, **common
    )
    decode = plait.Engine(disaggregation_mode="decode", **common)
    yield unified, prefill, decode, port
    for e in (unified, prefill, decode):
        e.shutdown()


def pd_generate(prefill, decode, port, prompts, sp=SP, run_prefill=True):
    """Both halves at once, as the gateway does; returns (prefill outputs, decode outputs)."""
    msgs = [
        GenerateReq(
            text=p, sampling_params=dict(sp), bootstrap=Bootstrap("127.0.0.1", port, next(rooms))
        )
        for p in prompts
    ]
    out: dict[str, list] = {}
    t = None
    if run_prefill:
        t = threading.Thread(target=lambda: out.__setitem__("p", prefill.generate_request(msgs)))
        t.start()
    d = decode.generate_request(msgs)
    if t is not None:
        t.join()
    return out.get("p"), d


def kv_idle(engine) -> bool:
    info = engine.get_server_info()
    return (
        info["available_kv_tokens"] + info["evictable_kv_tokens"] == info["max_total_tokens"]
        and info["num_running_reqs"] == 0
    )


@pytest.mark.slow
def test_decode_continues_from_transferred_kv_token_for_token(engines):
    unified, prefill, decode, port = engines
    want = [o["output_ids"] for o in unified.generate(PROMPTS, dict(SP))]
    p_out, d_out = pd_generate(prefill, decode, port, PROMPTS)
    assert [o["output_ids"] for o in d_out] == want
    assert all(o["output_ids"] == w[:1] for o, w in zip(p_out, want))
    info = decode.get_server_info()
    assert info["prefill_tokens"] == 0  # the decode engine computed no prompt token
    assert info["kv_transfers"] >= len(PROMPTS)
    assert kv_idle(decode) and kv_idle(prefill)


@pytest.mark.slow
def test_prefill_reuses_its_radix_cache_for_shared_prefixes(engines):
    _, prefill, decode, port = engines
    base = "A long shared system prompt that many requests start with. " * 10
    pd_generate(prefill, decode, port, [base + "First question?"])
    before = prefill.get_server_info()["cached_tokens"]
    pd_generate(prefill, decode, port, [base + "Second question?"])
    assert prefill.get_server_info()["cached_tokens"] - before > 100


@pytest.mark.slow
def test_missing_prefill_fails_the_request_in_bounded_time_and_frees_kv(engines):
    _, prefill, decode, port = engines
    _, d_out = pd_generate(prefill, decode, port, ["nobody prefills this"], run_prefill=False)
    reason = d_out[0]["meta_info"]["finish_reason"]
    assert reason["type"] == "error" and "no KV from the prefill server" in reason["message"]
    assert kv_idle(decode)
    _, d_out = pd_generate(prefill, decode, port, ["still serving"])  # the decode side lives on
    assert len(d_out[0]["output_ids"]) == SP["max_new_tokens"]


@pytest.mark.slow
def test_failed_write_fails_both_halves(engines):
    _, prefill, decode, port = engines
    prefill.disagg.transfer.fail_next = 1
    p_out, d_out = pd_generate(prefill, decode, port, ["this write fails"])
    assert d_out[0]["meta_info"]["finish_reason"]["type"] == "error"
    assert p_out[0]["meta_info"]["finish_reason"]["type"] == "error"
    assert kv_idle(decode) and kv_idle(prefill)


@pytest.mark.slow
def test_a_cancel_before_the_hand_off_ends_the_prefill_half_at_once(engines):
    """The decode side gave up (client gone) before the prefill side finished the prompt: the
    prefill half ends as an abort when it is handed off, not after the transfer timeout."""
    _, prefill, _, port = engines
    room = next(rooms)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(f"tcp://127.0.0.1:{port}")
    sock.send(encode({"op": "cancel", "room": room}))
    sock.close(linger=1000)
    ctx.term()
    time.sleep(0.3)  # the receiver thread has it
    start = time.monotonic()
    out = prefill.generate_request(
        [
            GenerateReq(
                text="cancelled early",
                sampling_params=dict(SP),
                bootstrap=Bootstrap("127.0.0.1", port, room),
            )
        ]
    )
    assert out[0]["meta_info"]["finish_reason"]["type"] == "abort"
    assert time.monotonic() - start < 2.0  # the transfer timeout is 3 s
    assert kv_idle(prefill)


def test_requests_must_match_the_mode(make_tiny_model):
    e = plait.Engine(
        model_path=make_tiny_model(),
        max_total_tokens=256,
        disaggregation_mode="decode",
        disaggregation_transfer_backend="fake",
    )
    try:
        with pytest.raises(ValueError, match="^bootstrap_room is required"):
            e.generate("hi")
        b = Bootstrap("127.0.0.1", 1234, 1)
        with pytest.raises(ValueError, match="^n must be 1"):
            e.generate_request([GenerateReq(text="hi", sampling_params={"n": 2}, bootstrap=b)])
        with pytest.raises(ValueError, match="^return_logprob"):
            e.generate_request([GenerateReq(text="hi", return_logprob=True, bootstrap=b)])
        for name, value in (
            ("regex", "[a-z]+"),
            ("json_schema", '{"type": "string"}'),
            ("ebnf", 'root ::= "a"'),
        ):
            with pytest.raises(ValueError, match=f"^{name}: constrained decoding"):
                e.generate_request(
                    [GenerateReq(text="hi", sampling_params={name: value}, bootstrap=b)]
                )
    finally:
        e.shutdown()
    with pytest.raises(ValueError, match="^bootstrap_room: one room per prompt"):
        check_rooms([GenerateReq(text=t, bootstrap=Bootstrap("h", 1, 7)) for t in "ab"])
    with pytest.raises(ValueError, match="^bootstrap_port"):
        Bootstrap("h", 0, 1)
