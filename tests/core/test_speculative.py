"""NGRAM speculative decoding: the output with speculation is the output without it (greedy
token for token, seeded sampling too), drafts really are verified and accepted, rejected KV is
freed, and speculative sampling keeps the model's distribution."""

from __future__ import annotations

import asyncio
import json
import random
import re

import pytest
import torch

import plait
from plait.core.spec.cost import PassCost
from plait.core.engine_config import EngineConfig
from plait.core.memory import TokenSlotAllocator
from plait.core.radix_cache import RadixCache
from plait.core.spec.config import settings_of
from plait.core.spec.ngram import DraftState, own_ngram_draft, radix_draft
from tests.core.test_engine_parity import run_batch
from tests.core.test_overlap_schedule import (
    REGEX,
    comparable,
    kv_is_all_free,
    mixed_requests,
)

# ----- settings -----


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"speculative_algorithm": "STANDALONE"}, "STANDALONE"),
        ({"speculative_algorithm": "EAGLE"}, "speculative_algorithm must be one of"),
        ({"speculative_num_steps": 3}, "needs speculative_algorithm"),
        (
            {"speculative_algorithm": "NGRAM", "speculative_draft_model_path": "x"},
            "speculative_draft_model_path",
        ),
        (
            {
                "speculative_algorithm": "NGRAM",
                "speculative_num_draft_tokens": 8,
                "speculative_num_steps": 3,
            },
            "draft tree",
        ),
        ({"speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 0}, "positive"),
        ({"speculative_algorithm": "NGRAM", "tp_size": 2}, "tensor parallelism"),
        ({"speculative_algorithm": "NGRAM", "page_size": 16}, "page_size"),
        (
            {"speculative_algorithm": "NGRAM", "disaggregation_mode": "decode"},
            "disaggregation_mode",
        ),
        ({"speculative_algorithm": "NGRAM", "max_lora_rank": 8}, "LoRA adapters"),
    ],
)
def test_unsupported_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs).validate()


def test_settings_follow_sglangs_meanings():
    def drafts(**kw):
        return settings_of(EngineConfig(speculative_algorithm="NGRAM", **kw)).max_drafts

    assert drafts() == 7
    assert drafts(speculative_num_draft_tokens=4) == 3
    assert drafts(speculative_num_steps=2) == 2
    assert drafts(speculative_num_draft_tokens=3, speculative_num_steps=5) == 2
    assert settings_of(EngineConfig()) is None


# ----- drafts -----


def test_own_ngram_draft_copies_what_followed_the_latest_earlier_occurrence():
    state = DraftState(budget=4)
    seq = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert own_ngram_draft(state, seq, 4, 1, 3) == [7, 8, 5, 1]  # the later "1 2 3" wins
    assert own_ngram_draft(DraftState(budget=4), [4, 5, 6], 3, 1, 3) == []
    # a loop continues past the end of the sequence
    assert own_ngram_draft(DraftState(budget=4), [6, 7, 6, 7], 5, 1, 2) == [6, 7, 6, 7, 6]


def test_radix_draft_continues_a_cached_sequence_without_changing_the_tree():
    cache = RadixCache(TokenSlotAllocator(64, page_size=1, device="cpu"))
    cache.insert([1, 2, 3, 4, 5, 6], torch.arange(6))
    cache.insert([1, 2, 9], torch.tensor([0, 1, 10]))
    before = cache.pretty_print()
    assert radix_draft(cache, [1, 2, 3], 2) == [4, 5]
    assert radix_draft(cache, [1, 2], 3) in ([3, 4, 5], [9])
    assert radix_draft(cache, [1, 2, 3, 4, 5, 6], 2) == []
    assert radix_draft(cache, [1, 7], 2) == []
    assert cache.pretty_print() == before


def test_draft_length_adapts_to_acceptance():
    s = DraftState(budget=4)
    s.record(4, 4, max_drafts=7)
    assert s.budget == 6
    s.record(6, 2, max_drafts=7)
    assert s.budget == 3
    s.record(3, 0, max_drafts=7)  # a miss: pause proposing for a while
    assert s.budget == 1 and s.next_budget() == 0 and s.cooldown > 0
    while s.cooldown:
        s.next_budget()
    assert s.next_budget() == 1


# ----- the engine: speculation on against off -----

REPEAT = random.Random(5)
REPETITIVE = [[REPEAT.randrange(100, 3000) for _ in range(9)] * 5 for _ in range(3)]


def run_all(engine: plait.Engine) -> list[dict]:
    async def go() -> list[dict]:
        mixed = [
            engine.async_generate(input_ids=ids, sampling_params=sp, **extra)
            for ids, sp, extra in mixed_requests()
        ]
        rep = [
            engine.async_generate(
                input_ids=ids,
                sampling_params={"max_new_tokens": 40, "temperature": 0, "ignore_eos": True},
                return_logprob=i == 0,
            )
            for i, ids in enumerate(REPETITIVE)
        ]
        return await asyncio.gather(*mixed, *rep)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def plain_outputs(tiny):
    with plait.Engine(tiny, disable_overlap_schedule=True) as engine:
        return [comparable(o) for o in run_all(engine)]


@pytest.mark.parametrize(
    "engine_args, retracts",
    [
        ({}, False),
        ({"chunked_prefill_size": 32, "speculative_num_draft_tokens": 4}, False),
        ({"max_total_tokens": 256, "chunked_prefill_size": 32}, True),
        ({"verify_as_decode": False}, False),
    ],
    ids=["plain", "chunked32-k3", "tight-chunked32", "extend-shaped"],
)
def test_speculation_gives_every_request_kind_the_same_output(
    tiny, plain_outputs, engine_args, retracts
):
    """Run twice: the second run drafts from the first's outputs in the prefix cache, so
    long drafts are accepted under every feature (the random model rarely repeats itself)."""
    args = dict(engine_args)
    shaped = args.pop("verify_as_decode", None)
    with plait.Engine(tiny, speculative_algorithm="NGRAM", **args) as engine:
        if shaped is not None:
            engine.scheduler.verify_as_decode = shaped
        # untimed passes leave the cost model without a fit, so drafts are as long as the
        # proposer allows (pass times on a loaded machine would vary the cap between runs)
        engine.scheduler.output.observe_pass = None
        engine.scheduler.spec.cost = PassCost()  # nor a fit from passes timed at start-up
        first = run_all(engine)
        again = run_all(engine)
        info = engine.get_server_info()
        assert [comparable(o) for o in first] == plain_outputs
        assert [comparable(o) for o in again] == plain_outputs
        for o, (_, sp, _) in zip(again, mixed_requests()):
            assert len(o["output_ids"]) <= sp["max_new_tokens"]
        for o in again[3:12:6]:
            assert re.fullmatch(REGEX, o["text"])
        for o in again[4:12:6]:
            assert set(json.loads(o["text"])) == {"a"}
        assert info["spec_verify_passes"] > 0
        assert info["overlap_schedule"] is False and info["speculative_algorithm"] == "NGRAM"
        if retracts:  # the tight pool evicts the first run's outputs: few drafts
            assert info["retractions"] > 0
        else:
            assert info["spec_accepted_tokens"] > 100
            rep = again[-1]["meta_info"]
            assert rep["spec_verify_ct"] < len(again[-1]["output_ids"]) // 2  # fewer forwards
        assert kv_is_all_free(engine)


def test_a_repeated_prompt_drafts_from_the_prefix_cache(tiny):
    """The second run of a prompt finds the first run's output in the radix tree: nearly
    every token is accepted, and the output is the same."""
    ids = [REPEAT.randrange(100, 30000) for _ in range(40)]  # no repeats of its own
    sp = {"max_new_tokens": 30, "temperature": 0, "ignore_eos": True}
    with plait.Engine(tiny, speculative_algorithm="NGRAM") as engine:
        first = engine.generate(input_ids=ids, sampling_params=sp)
        second = engine.generate(input_ids=ids, sampling_params=sp)
    assert second["output_ids"] == first["output_ids"]
    assert second["meta_info"]["cached_tokens"] > 0
    assert second["meta_info"]["spec_verify_ct"] <= 8
    assert second["meta_info"]["spec_accept_token_num"] >= 20


def test_server_flags_reach_the_engine_and_refusals_stop_the_launch():
    from plait.server.server_args import ServerArgs

    args = ServerArgs(speculative_algorithm="NGRAM", speculative_num_draft_tokens=5)
    args.validate()
    kw = args.engine_kwargs("/m")
    assert kw["speculative_algorithm"] == "NGRAM" and kw["speculative_num_draft_tokens"] == 5
    assert "--speculative-algorithm" in args.to_argv()
    with pytest.raises(ValueError, match="STANDALONE"):
        ServerArgs(speculative_algorithm="STANDALONE").validate()
    with pytest.raises(ValueError, match="tensor parallelism"):
        ServerArgs(speculative_algorithm="NGRAM", tp=2).validate()


@pytest.mark.slow
def test_speculation_matches_transformers_on_the_default_model(smollm_dir, prompt_ids, expected):
    """HF parity under speculation: the batch, then again from the cache (long drafts)."""
    with plait.Engine(smollm_dir, speculative_algorithm="NGRAM") as engine:
        assert run_batch(engine, prompt_ids) == expected
        assert run_batch(engine, prompt_ids) == expected
        assert engine.get_server_info()["spec_accepted_tokens"] > 100
