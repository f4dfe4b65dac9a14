"""Greedy outputs equal transformers' generate token for token (float32), whatever the batch
composition, prefix-cache state, chunking or page size. The correctness oracle of the engine."""

from __future__ import annotations

import pytest
import torch

import plait
from tests.conftest import hf_greedy

SHARED = (
    "You are a careful assistant. Answer briefly and precisely. Here is some context "
    "about the solar system: the Sun is a star at the centre; eight planets orbit it, "
    "from Mercury, the smallest and closest, to Neptune, the farthest. "
)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
    SHARED + "Question: which planet is the largest?",
    SHARED + "Question: how many planets orbit the Sun?",
    SHARED + "Question: what is at the centre?",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
NEW = 32
GREEDY = {"max_new_tokens": NEW, "temperature": 0}


# prompt_ids and expected (transformers' tokens for PROMPTS) are session fixtures in
# tests/conftest.py: six modules check SmolLM2 against them and share one computation.


def run_batch(engine, prompt_ids):
    return [o["output_ids"] for o in engine.generate(input_ids=prompt_ids, sampling_params=GREEDY)]


@pytest.mark.slow
def test_each_prompt_alone_matches_transformers(smollm_dir, prompt_ids, expected):
    with plait.Engine(smollm_dir, disable_radix_cache=True) as engine:
        for ids, want in zip(prompt_ids, expected):
            assert engine.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"] == want


@pytest.mark.slow
def test_one_batch_then_cache_hits_match_transformers(smollm_dir, prompt_ids, expected):
    with plait.Engine(smollm_dir) as engine:
        assert run_batch(engine, prompt_ids) == expected
        again = engine.generate(input_ids=prompt_ids, sampling_params=GREEDY)
        assert [o["output_ids"] for o in again] == expected
        # the second round is served from the prefix cache (all but the last prompt token)
        assert all(
            o["meta_info"]["cached_tokens"] == len(ids) - 1 for o, ids in zip(again, prompt_ids)
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine_args",
    [
        {"chunked_prefill_size": 64},
        {"page_size": 16},
        {"page_size": 16, "chunked_prefill_size": 64, "schedule_policy": "fcfs"},
    ],
    ids=["chunked64", "page16", "page16-chunked64-fcfs"],
)
def test_variants_match_transformers(smollm_dir, prompt_ids, expected, engine_args):
    with plait.Engine(smollm_dir, **engine_args) as engine:
        # warm the cache with the shared prefix so later prompts hit it mid-batch
        engine.generate(input_ids=prompt_ids[4][:40], sampling_params={"max_new_tokens": 0})
        assert run_batch(engine, prompt_ids) == expected
        assert any(
            o["meta_info"]["cached_tokens"] > 0
            for o in engine.generate(input_ids=prompt_ids[4:7], sampling_params=GREEDY)
        )


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_tiny_model_families_match_transformers(make_tiny_model, model_type):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(model_type)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[5, 17, 300, 4000], [9, 9, 9, 9, 9, 9, 9, 9, 120], list(range(100, 160))]
    want = hf_greedy(hf, prompts, 12)
    with plait.Engine(path, chunked_prefill_size=16) as engine:
        got = engine.generate(
            input_ids=prompts, sampling_params={"max_new_tokens": 12, "temperature": 0}
        )
    assert [o["output_ids"] for o in got] == want
