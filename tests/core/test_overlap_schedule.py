"""The overlap (zero-overhead) schedule: same tokens as the inline schedule and as transformers,
for every kind of request batched together, under chunking and retraction; nothing lost,
duplicated or past its limit under many streaming clients with aborts."""

from __future__ import annotations

import asyncio
import json
import random
import re

import pytest
import torch

import plait
from plait.core.future_tokens import FutureTokenMap
from tests.core.test_engine_parity import NEW

# ----- the future-token map -----


def test_placeholders_resolve_to_stored_tokens_and_leave_real_ids_alone():
    fm = FutureTokenMap(max_batch_size=4)
    a = fm.reserve(3)
    assert all(p < 0 for p in a) and len(set(a)) == 3
    fm.store(a, [11, 12, 13])
    ids = torch.tensor([a[2], 7, a[0], 0])
    assert fm.resolve(ids).tolist() == [13, 7, 11, 0]


def test_placeholders_are_not_reused_within_three_full_batches():
    fm = FutureTokenMap(max_batch_size=5)
    seen = [p for _ in range(3) for p in fm.reserve(5)]
    assert len(set(seen)) == 15
    fm.store(seen[:5], [1, 2, 3, 4, 5])
    fm.store(fm.reserve(5), [9] * 5)  # a fourth batch must not overwrite the first
    assert fm.resolve(torch.tensor(seen[:5])).tolist() == [1, 2, 3, 4, 5]


def test_reserving_more_than_a_batch_is_refused():
    with pytest.raises(ValueError, match="placeholders"):
        FutureTokenMap(max_batch_size=2).reserve(3)


# ----- a tiny model: every request kind, overlap on vs off -----

REGEX = r"\d{3}-\d{4}"
SCHEMA = {
    "type": "object",
    "required": ["a"],
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
}


def mixed_requests(n_prompts: int = 12) -> list[tuple[list[int], dict, dict]]:
    """(input_ids, sampling_params, extra generate kwargs) covering greedy, seeded sampling,
    penalties, min_new_tokens, stop strings and tokens, logprobs and constraints."""
    rng = random.Random(3)
    reqs = []
    for b in range(n_prompts):
        ids = [rng.randrange(100, 30000) for _ in range(20 + 13 * b)]
        kind = b % 6
        if kind == 0:
            sp = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
        elif kind == 1:
            sp = {
                "max_new_tokens": 20,
                "temperature": 1.0,
                "top_p": 0.9,
                "seed": b,
                "ignore_eos": True,
                "frequency_penalty": 0.5,
            }
        elif kind == 2:
            sp = {
                "max_new_tokens": 30,
                "temperature": 0,
                "ignore_eos": True,
                "stop": ["e"],
                "min_new_tokens": 3,
            }
        elif kind == 3:
            sp = {"max_new_tokens": 16, "temperature": 0, "regex": REGEX}
        elif kind == 4:
            sp = {
                "max_new_tokens": 40,
                "temperature": 0.8,
                "seed": b,
                "json_schema": json.dumps(SCHEMA),
            }
        else:
            sp = {
                "max_new_tokens": 1 + b,
                "temperature": 0,
                "ignore_eos": True,
                "stop_token_ids": [ids[0] % 500 + 200],
            }
        extra = {"return_logprob": True, "top_logprobs_num": 2} if b % 4 == 1 else {}
        reqs.append((ids, sp, extra))
    return reqs


def run_mixed(engine: plait.Engine) -> list[dict]:
    async def go() -> list[dict]:
        return await asyncio.gather(
            *[
                engine.async_generate(input_ids=ids, sampling_params=sp, **extra)
                for ids, sp, extra in mixed_requests()
            ]
        )

    return asyncio.run(go())


def comparable(out: dict) -> tuple:
    """Tokens, text and finish exactly; logprobs to 1e-4 (a batch of another shape may round
    the last float bit differently)."""
    meta = out["meta_info"]
    lps = [
        (pytest.approx(lp, abs=1e-4) if lp is not None else None, t)
        for lp, t, _ in meta.get("output_token_logprobs") or []
    ]
    tops = [
        [(pytest.approx(lp, abs=1e-4), t) for lp, t, _ in top] if top else None
        for top in meta.get("output_top_logprobs") or []
    ]
    return out["output_ids"], out["text"], meta["finish_reason"], lps, tops


def kv_is_all_free(engine) -> bool:
    info = engine.get_server_info()
    return info["available_kv_tokens"] + info["cached_kv_tokens"] == info["max_total_tokens"]


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def inline_outputs(tiny):
    with plait.Engine(tiny, disable_overlap_schedule=True) as engine:
        assert engine.get_server_info()["overlap_schedule"] is False
        return [comparable(o) for o in run_mixed(engine)]


@pytest.mark.parametrize(
    "engine_args, retracts",
    [
        ({}, False),
        ({"chunked_prefill_size": 32}, False),
        ({"max_total_tokens": 256, "chunked_prefill_size": 32}, True),
        ({"max_total_tokens": 192, "page_size": 16}, False),  # queues rather than retracts
    ],
    ids=["plain", "chunked32", "tight-chunked32", "tight-page16"],
)
def test_overlap_gives_every_request_kind_the_same_output(
    tiny, inline_outputs, engine_args, retracts
):
    with plait.Engine(tiny, **engine_args) as engine:
        assert engine.get_server_info()["overlap_schedule"] is True
        outs = run_mixed(engine)
        assert [comparable(o) for o in outs] == inline_outputs
        for o, (_, sp, _) in zip(outs, mixed_requests()):
            assert len(o["output_ids"]) <= sp["max_new_tokens"]
        for o in outs[3::6]:
            assert re.fullmatch(REGEX, o["text"])
        for o in outs[4::6]:
            assert set(json.loads(o["text"])) == {"a"}
        if retracts:
            assert engine.get_server_info()["retractions"] > 0
        assert kv_is_all_free(engine)


def test_step_time_is_split_into_phases(tiny):
    with plait.Engine(tiny) as engine:
        engine.generate(
            input_ids=[[5] * 30] * 4, sampling_params={"max_new_tokens": 8, "ignore_eos": True}
        )
        info = engine.get_server_info()
    assert info["forward_passes"] >= 8
    for phase in ("schedule", "forward", "process", "wait"):
        assert info[f"{phase}_seconds"] >= 0
    assert info["forward_seconds"] > 0 and info["schedule_seconds"] > 0
    assert info["process_seconds"] > 0


def test_a_request_finishing_in_flight_gets_no_extra_token(tiny):
    """Requests of every length finish exactly at max_new_tokens, streamed outputs never
    exceed it, and their text only grows."""
    with plait.Engine(tiny) as engine:
        streams = [
            engine.generate(
                input_ids=[7 + n] * 12,
                stream=True,
                sampling_params={"max_new_tokens": n, "ignore_eos": True},
            )
            for n in range(1, 9)
        ]
        for n, stream in zip(range(1, 9), streams):
            outs = list(stream)
            counts = [o["meta_info"]["completion_tokens"] for o in outs]
            assert counts == sorted(counts) and max(counts) == n
            assert len(outs[-1]["output_ids"]) == n
            texts = [o["text"] for o in outs]
            assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
            assert [o["meta_info"]["finish_reason"] is None for o in outs] == [True] * (
                len(outs) - 1
            ) + [False]
        assert kv_is_all_free(engine)


def test_abort_right_after_submission_frees_kv_with_overlap(tiny):
    with plait.Engine(tiny, chunked_prefill_size=16) as engine:
        streams = [
            engine.generate(
                input_ids=[9 + b] * (10 + 7 * b),
                rid=f"r{b}",
                stream=True,
                sampling_params={"max_new_tokens": 50 + b, "ignore_eos": True},
            )
            for b in range(10)
        ]
        for b in range(0, 10, 2):
            engine.abort(f"r{b}")
        finals = [list(s)[-1]["meta_info"]["finish_reason"]["type"] for s in streams]
        assert finals[1::2] == ["length"] * 5
        assert set(finals[0::2]) <= {"abort", "length"}
        assert kv_is_all_free(engine)


# ----- the real model -----


@pytest.mark.slow
def test_parity_prompts_in_a_mixed_batch_match_transformers_with_overlap(
    smollm_dir, prompt_ids, expected
):
    """Greedy parity prompts batched with sampled, constrained, stopped and aborted requests,
    chunked, in a pool small enough to retract: overlap on equals transformers and overlap
    off."""
    ids = prompt_ids
    noise = mixed_requests(6)

    def run(engine: plait.Engine) -> tuple[list[list[int]], list[tuple]]:
        async def go():
            greedy = [
                engine.async_generate(
                    input_ids=p, sampling_params={"max_new_tokens": NEW, "temperature": 0}
                )
                for p in ids
            ]
            others = [
                engine.async_generate(input_ids=p, sampling_params=sp, **extra)
                for p, sp, extra in noise
            ]
            victims = [
                asyncio.ensure_future(
                    engine.async_generate(
                        input_ids=p,
                        rid=f"victim{i}",
                        sampling_params={"max_new_tokens": 64, "ignore_eos": True},
                    )
                )
                for i, p in enumerate(ids[:3])
            ]
            await asyncio.sleep(0.3)
            for i in range(3):
                engine.abort(f"victim{i}")
            done = await asyncio.gather(*greedy, *others, *victims)
            return done[: len(ids)], done[len(ids) : len(ids) + len(noise)]

        g, o = asyncio.run(go())
        return [x["output_ids"] for x in g], [comparable(x) for x in o]

    args = {"chunked_prefill_size": 64, "max_total_tokens": 200}
    with plait.Engine(smollm_dir, **args) as overlap:
        got, others = run(overlap)
        assert overlap.get_server_info()["retractions"] > 0
        assert kv_is_all_free(overlap)
    assert got == expected
    with plait.Engine(smollm_dir, disable_overlap_schedule=True, **args) as inline:
        got_inline, others_inline = run(inline)
    assert got_inline == expected
    assert others == others_inline


@pytest.mark.slow
def test_64_streaming_clients_with_random_aborts_lose_and_duplicate_nothing(smollm_dir):
    rng = random.Random(11)
    n = 64

    async def client(engine: plait.Engine, i: int) -> tuple[str, list[dict]]:
        max_new = rng.randrange(1, 40)
        stream = await engine.async_generate(
            prompt=f"Request {i}: count from {i} upwards:",
            rid=f"c{i}",
            stream=True,
            sampling_params={
                "max_new_tokens": max_new,
                "temperature": rng.choice([0, 1]),
                "ignore_eos": True,
            },
        )
        outs = []
        abort_after = rng.randrange(1, 30) if i % 3 == 0 else None
        async for out in stream:
            outs.append(out)
            if abort_after is not None and len(outs) == abort_after:
                engine.abort(f"c{i}")
        return max_new, outs

    with plait.Engine(smollm_dir, max_total_tokens=1500) as engine:

        async def go():
            return await asyncio.gather(*[client(engine, i) for i in range(n)])

        results = asyncio.run(go())
        assert kv_is_all_free(engine)
        assert engine.get_server_info()["num_running_reqs"] == 0
    for i, (max_new, outs) in enumerate(results):
        finals = [o for o in outs if o["meta_info"]["finish_reason"] is not None]
        assert len(finals) == 1 and outs[-1] is finals[0], f"c{i}"
        assert all(o["meta_info"]["id"] == f"c{i}" for o in outs)
        counts = [o["meta_info"]["completion_tokens"] for o in outs]
        assert counts == sorted(counts) and counts[-1] <= max_new
        kind = finals[0]["meta_info"]["finish_reason"]["type"]
        assert kind in ("length", "abort") if i % 3 == 0 else kind == "length"
        if kind == "length":
            assert counts[-1] == max_new


def test_a_failing_forward_fails_its_requests_and_the_engine_serves_on(tiny):
    """The batch after the failing one was launched with placeholders the failure never
    filled: its rows for the failed requests are dropped, nothing hangs, KV is freed."""
    with plait.Engine(tiny) as engine:
        runner = engine.scheduler.runner
        real_run, calls = runner.run, []

        def flaky(batch):
            calls.append(batch.is_decode)
            if len(calls) == 4:
                raise RuntimeError("device fell over")
            return real_run(batch)

        runner.run = flaky
        sp = {"max_new_tokens": 12, "ignore_eos": True, "temperature": 0}
        outs = engine.generate(input_ids=[[5] * 10, [6] * 12], sampling_params=sp)
        assert [o["meta_info"]["finish_reason"]["type"] for o in outs] == ["error", "error"]
        assert "device fell over" in outs[0]["meta_info"]["finish_reason"]["message"]
        after = engine.generate(input_ids=[7] * 9, sampling_params=sp)
        assert len(after["output_ids"]) == 12
        assert kv_is_all_free(engine)
