"""Sampling parameters, stop conditions, logprobs, n, streaming and async through the Engine."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

import plait


@pytest.fixture(scope="module")
def engine(make_tiny_model):
    with plait.Engine(make_tiny_model("llama")) as e:
        yield e


PROMPT = [11, 22, 33, 44, 55]


def gen(engine, **sp):
    return engine.generate(input_ids=PROMPT, sampling_params=sp)


def test_seed_makes_sampling_reproducible(engine):
    a = gen(engine, temperature=1.0, seed=7, max_new_tokens=16, ignore_eos=True)
    b = gen(engine, temperature=1.0, seed=7, max_new_tokens=16, ignore_eos=True)
    c = gen(engine, temperature=1.0, seed=8, max_new_tokens=16, ignore_eos=True)
    assert a["output_ids"] == b["output_ids"]
    assert a["output_ids"] != c["output_ids"]


def test_top_k_one_and_tiny_top_p_equal_greedy(engine):
    greedy = gen(engine, temperature=0, max_new_tokens=10, ignore_eos=True)["output_ids"]
    assert (
        gen(engine, temperature=1.5, top_k=1, max_new_tokens=10, ignore_eos=True, seed=1)[
            "output_ids"
        ]
        == greedy
    )
    assert (
        gen(engine, temperature=1.0, top_p=1e-6, max_new_tokens=10, ignore_eos=True, seed=2)[
            "output_ids"
        ]
        == greedy
    )
    assert (
        gen(engine, temperature=1.0, min_p=0.9999, max_new_tokens=10, ignore_eos=True, seed=3)[
            "output_ids"
        ]
        == greedy
    )


def test_stop_token_ids_and_min_new_tokens(engine):
    greedy = gen(engine, temperature=0, max_new_tokens=10, ignore_eos=True)["output_ids"]
    out = gen(engine, temperature=0, max_new_tokens=10, stop_token_ids=[greedy[3]], ignore_eos=True)
    first = greedy.index(greedy[3])
    assert out["output_ids"] == greedy[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": greedy[3]}
    # min_new_tokens forbids stopping early: the stop token is masked, so output differs
    later = gen(
        engine,
        temperature=0,
        max_new_tokens=10,
        min_new_tokens=first + 2,
        stop_token_ids=[greedy[3]],
        ignore_eos=True,
    )
    assert len(later["output_ids"]) >= first + 2
    assert greedy[3] not in later["output_ids"][: first + 2]


def test_stop_string_is_trimmed_and_reported(engine):
    full = gen(engine, temperature=0, max_new_tokens=12, ignore_eos=True)
    text = full["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    out = gen(engine, temperature=0, max_new_tokens=12, stop=stop, ignore_eos=True)
    assert out["text"] == text[: text.index(stop)]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    kept = gen(
        engine, temperature=0, max_new_tokens=12, stop=[stop], no_stop_trim=True, ignore_eos=True
    )
    assert kept["text"] == text[: text.index(stop) + len(stop)]


def test_penalties_change_greedy_output(engine):
    base = gen(engine, temperature=0, max_new_tokens=24, ignore_eos=True)["output_ids"]
    for sp in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0}):
        out = gen(engine, temperature=0, max_new_tokens=24, ignore_eos=True, **sp)["output_ids"]
        assert len(out) == 24
        if len(set(base)) < len(base):  # only a repeating output can be changed by penalties
            assert out != base, sp


def test_n_returns_n_distinct_samples(engine):
    outs = engine.generate(
        input_ids=PROMPT,
        sampling_params={
            "n": 3,
            "temperature": 1.0,
            "seed": 5,
            "max_new_tokens": 8,
            "ignore_eos": True,
        },
    )
    assert isinstance(outs, list) and len(outs) == 3
    assert len({tuple(o["output_ids"]) for o in outs}) > 1


def test_logprobs_are_consistent_with_a_full_forward(engine, make_tiny_model):
    from transformers import AutoModelForCausalLM

    out = engine.generate(
        input_ids=PROMPT,
        return_logprob=True,
        logprob_start_len=0,
        top_logprobs_num=3,
        sampling_params={"temperature": 0, "max_new_tokens": 4, "ignore_eos": True},
    )
    meta = out["meta_info"]
    ids = PROMPT + out["output_ids"]
    hf = AutoModelForCausalLM.from_pretrained(make_tiny_model("llama"), dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    inp = meta["input_token_logprobs"]
    assert [t for _, t, _ in inp] == PROMPT and inp[0][0] is None
    for pos in range(1, len(PROMPT)):
        assert math.isclose(inp[pos][0], logp[pos - 1, ids[pos]].item(), abs_tol=1e-4)
    outlp = meta["output_token_logprobs"]
    for k, (lp, tok, _) in enumerate(outlp):
        pos = len(PROMPT) + k
        assert tok == ids[pos]
        assert math.isclose(lp, logp[pos - 1, tok].item(), abs_tol=1e-4)
        top = meta["output_top_logprobs"][k]
        assert len(top) == 3 and top[0][1] == tok  # greedy picks the top-1 token


def test_prompt_logprobs_after_a_cache_hit(engine):
    prefix = list(range(300, 340))
    engine.generate(input_ids=prefix, sampling_params={"max_new_tokens": 0})
    a = engine.generate(
        input_ids=prefix + [7, 8, 9],
        return_logprob=True,
        logprob_start_len=len(prefix),
        sampling_params={"max_new_tokens": 0},
    )
    assert a["meta_info"]["cached_tokens"] >= len(prefix) - 1
    assert [t for _, t, _ in a["meta_info"]["input_token_logprobs"]] == [7, 8, 9]
    engine.flush_cache()
    b = engine.generate(
        input_ids=prefix + [7, 8, 9],
        return_logprob=True,
        logprob_start_len=len(prefix),
        sampling_params={"max_new_tokens": 0},
    )
    for (la, _, _), (lb, _, _) in zip(
        a["meta_info"]["input_token_logprobs"], b["meta_info"]["input_token_logprobs"]
    ):
        assert math.isclose(la, lb, abs_tol=1e-4)


def test_streaming_chunks_grow_to_the_final_text(engine):
    sp = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    chunks = list(engine.generate(input_ids=PROMPT, sampling_params=sp, stream=True))
    final = gen(engine, **sp)
    assert chunks[-1]["text"] == final["text"]
    assert chunks[-1]["output_ids"] == final["output_ids"]
    for a, b in zip(chunks, chunks[1:]):
        assert b["text"].startswith(a["text"])
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


def test_async_generate_and_async_stream(engine):
    sp = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    want = gen(engine, **sp)

    async def main():
        one = await engine.async_generate(input_ids=PROMPT, sampling_params=sp)
        many = await asyncio.gather(
            *[engine.async_generate(input_ids=PROMPT, sampling_params=sp) for _ in range(4)]
        )
        stream = await engine.async_generate(input_ids=PROMPT, sampling_params=sp, stream=True)
        chunks = [c async for c in stream]
        return one, many, chunks

    one, many, chunks = asyncio.run(main())
    assert one["output_ids"] == want["output_ids"]
    assert all(m["output_ids"] == want["output_ids"] for m in many)
    assert chunks[-1]["text"] == want["text"]


def test_text_prompt_and_batch_of_texts(engine):
    one = engine.generate("Hello there", {"max_new_tokens": 3, "temperature": 0})
    many = engine.generate(["Hello there", "Good morning"], {"max_new_tokens": 3, "temperature": 0})
    assert isinstance(one, dict) and isinstance(many, list) and len(many) == 2
    assert many[0]["output_ids"] == one["output_ids"]
