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


def pd_generate(prefill, decode, port, prompts, sp=SP, run_prefill=True, **extra):
    """Both halves at once, as the gateway does; returns (prefill outputs, decode outputs)."""
    msgs = [
        GenerateReq(
            text=p,
            sampling_params=dict(sp),
            bootstrap=Bootstrap("127.0.0.1", port, next(rooms)),
            **extra,
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


LOGPROBS = {"return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3}
LOGPROB_KEYS = (
    "input_token_logprobs",
    "input_top_logprobs",
    "output_token_logprobs",
    "output_top_logprobs",
)


def logprob_values(meta: dict) -> list:
    """The logprob fields of ``meta_info``, flattened to (key, position, k, token, logprob)."""
    rows = []
    for key in LOGPROB_KEYS:
        for pos, entry in enumerate(meta[key]):
            for k, e in enumerate((entry or []) if "top" in key else [entry]):
                rows.append((key, pos, k, e[1], e[0]))
    return rows


@pytest.mark.slow
def test_logprobs_prompt_and_output_equal_unified(engines):
    """The prompt's logprobs and the first token's come from the prefill side with the KV;
    the decode side returns the whole set, as a unified engine does."""
    unified, prefill, decode, port = engines
    want = unified.generate_request(
        [GenerateReq(text=p, sampling_params=dict(SP), **LOGPROBS) for p in PROMPTS[1:]]
    )
    _, got = pd_generate(prefill, decode, port, PROMPTS[1:], **LOGPROBS)
    for w, g in zip(want, got):
        assert g["output_ids"] == w["output_ids"]
        wm, gm = w["meta_info"], g["meta_info"]
        assert len(gm["input_token_logprobs"]) == len(wm["input_token_logprobs"]) > 1
        assert len(gm["output_token_logprobs"]) == SP["max_new_tokens"]
        wr, gr = logprob_values(wm), logprob_values(gm)
        assert [r[:4] for r in gr] == [r[:4] for r in wr]  # the same tokens everywhere
        assert [r[4] for r in gr] == pytest.approx([r[4] for r in wr], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "constraint",
    [
        {"regex": "(Hello|Goodbye), world! [a-z]{1,6}"},
        {
            "json_schema": '{"type": "object", "properties": {"ok": {"type": "boolean"}}, '
            '"required": ["ok"], "additionalProperties": false}'
        },
    ],
    ids=["regex", "json_schema"],
)
def test_constrained_decoding_equals_unified(engines, constraint):
    """The first token is sampled under the grammar on the prefill side; the decode side
    advances its own grammar past it and appends the forced continuation a unified engine
    would, so the outputs are the same."""
    unified, prefill, decode, port = engines
    sp = {"max_new_tokens": 24, "temperature": 0, **constraint}
    want = [o["output_ids"] for o in unified.generate(PROMPTS[:2], dict(sp))]
    _, got = pd_generate(prefill, decode, port, PROMPTS[:2], sp=sp)
    assert [o["output_ids"] for o in got] == want
    assert all(o["meta_info"]["finish_reason"]["type"] == "stop" for o in got)


@pytest.mark.slow
def test_n_samples_each_pair_with_a_room_of_their_own(engines):
    """``n > 1``: both halves expand the request the same way, each sample under a room
    derived from the gateway's, so every sample's KV reaches its own decode request."""
    unified, prefill, decode, port = engines
    sp = {**SP, "n": 3}
    want = unified.generate_request([GenerateReq(text=PROMPTS[1], sampling_params=dict(sp))])
    p_out, got = pd_generate(prefill, decode, port, [PROMPTS[1]], sp=sp)
    assert len(got) == len(p_out) == 3
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert kv_idle(decode) and kv_idle(prefill)


@pytest.mark.slow
def test_seeded_samples_continue_the_prefill_sides_generator(engines):
    """A seeded request's first token is drawn on the prefill side; the decode side carries
    on from that generator's state, so every sample equals a unified engine's."""
    unified, prefill, decode, port = engines
    sp = {"max_new_tokens": 12, "temperature": 1.0, "seed": 7, "n": 2, "ignore_eos": True}
    want = unified.generate_request([GenerateReq(text=PROMPTS[1], sampling_params=dict(sp))])
    _, got = pd_generate(prefill, decode, port, [PROMPTS[1]], sp=sp)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert want[0]["output_ids"] != want[1]["output_ids"]  # they did sample


@pytest.mark.slow
def test_prefill_reuses_its_radix_cache_for_shared_prefixes(engines):
    _, prefill, decode, port = engines
    base = "A long shared system prompt that many requests start with. " * 10
    pd_generate(prefill, decode, port, [base + "First question?"])
    before = prefill.get_server_info()["cached_tokens"]
    pd_generate(prefill, decode, port, [base + "Second question?"])
    assert prefill.get_server_info()["cached_tokens"] - before > 100


def test_decode_reuses_its_radix_cache_and_receives_only_the_rest(engines):
    """The decode server's radix cache takes every transferred prompt: a later prompt sharing
    its prefix gets only the rest of its KV over the transfer (fewer tokens and bytes), and
    the output stays a unified engine's."""
    unified, prefill, decode, port = engines
    base = "Decode-side cache: a shared preamble the decode server saw before. " * 6
    prompts = [base + "First question?", base + "Second question?", base + "First question?"]
    ids = unified.tokenizer(prompts)["input_ids"]
    lens = [len(x) for x in ids]
    shared = next(i for i, (a, b) in enumerate(zip(*ids[:2])) if a != b)  # the preamble
    want = [o["output_ids"] for o in unified.generate(prompts, dict(SP))]
    counters = ("kv_tokens_received", "kv_tokens_reused", "kv_bytes_received")
    seen = [{k: decode.get_server_info()[k] for k in counters}]
    got = []
    for prompt in prompts:  # one at a time: each finds the previous one's prompt cached
        got += pd_generate(prefill, decode, port, [prompt])[1]
        seen.append({k: decode.get_server_info()[k] for k in counters})
    assert [o["output_ids"] for o in got] == want
    step = [{k: b[k] - a[k] for k in counters} for a, b in zip(seen, seen[1:])]
    assert step[0]["kv_tokens_received"] == lens[0] and step[0]["kv_tokens_reused"] == 0
    assert step[1]["kv_tokens_reused"] == shared > 80
    assert step[1]["kv_tokens_received"] == lens[1] - step[1]["kv_tokens_reused"]
    assert step[1]["kv_bytes_received"] < step[0]["kv_bytes_received"] / 4
    # the same prompt again: all but its last token (whose logits the prefill side needs)
    assert (step[2]["kv_tokens_reused"], step[2]["kv_tokens_received"]) == (lens[2] - 1, 1)
    assert kv_idle(decode) and kv_idle(prefill)


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
def test_a_busy_prefill_keeps_its_decode_half_waiting_past_the_timeout(engines):
    """The prefill server's heartbeat tells busy from dead: a forward pass that takes longer
    than the transfer timeout (3 s here; one step made to take 4.5 s, as a long prefill on a
    loaded machine does) does not fail the request waiting for it on the decode side."""
    unified, prefill, decode, port = engines
    scheduler = prefill.scheduler
    step = scheduler.step

    def slow_step() -> None:
        del scheduler.step  # once: back to the real method
        time.sleep(4.5)
        step()

    scheduler.step = slow_step
    start = time.monotonic()
    _, got = pd_generate(prefill, decode, port, [PROMPTS[1]])
    assert time.monotonic() - start > 4.5
    assert got[0]["meta_info"]["finish_reason"]["type"] == "length", got[0]["meta_info"]
    assert got[0]["output_ids"] == unified.generate(PROMPTS[1], dict(SP))["output_ids"]
    assert kv_idle(decode) and kv_idle(prefill)


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
    finally:
        e.shutdown()
    with pytest.raises(ValueError, match="^bootstrap_room: one room per prompt"):
        check_rooms([GenerateReq(text=t, bootstrap=Bootstrap("h", 1, 7)) for t in "ab"])
    with pytest.raises(ValueError, match="^bootstrap_port"):
        Bootstrap("h", 0, 1)


def test_each_sample_of_a_disaggregated_request_gets_its_own_room():
    b = Bootstrap("h", 1, 2**63 - 2)
    msg = GenerateReq(text="x", sampling_params={"n": 4}, bootstrap=b)
    got = [one.bootstrap for one in msg.expand()]
    assert got[0] == b and len({x.room for x in got}) == 4
    assert all(0 <= x.room < 2**63 and (x.host, x.port) == ("h", 1) for x in got)
    assert [one.bootstrap for one in msg.expand()] == got  # both halves derive the same
