"""The null model (issue 41): registered through the model hook, loaded by ``plait.Engine``
from the directory ``make_null_checkpoint`` writes, its tokens the documented chain whether
the batch is greedy (GreedyTokens, no logits) or sampled (logits over the full vocabulary),
and its forward doing no work a step could be charged for."""

from __future__ import annotations

import pytest

import plait
from plait.models.default import default_model_path
from plait.models.null import ARCHITECTURE, make_null_checkpoint, next_token
from plait.models.registry import model_loaders


def _chain(token: int, n: int, vocab: int) -> list[int]:
    out = []
    for _ in range(n):
        token = next_token(token, vocab)
        out.append(token)
    return out


@pytest.fixture(scope="module")
def null_engine(tmp_path_factory):
    tokenizer = default_model_path()  # the default model's tokenizer: real detokenization
    path = make_null_checkpoint(tmp_path_factory.mktemp("null"), tokenizer)
    engine = plait.Engine(str(path), max_total_tokens=4096, max_running_requests=8)
    yield engine
    engine.shutdown()


def test_the_null_model_registers_through_the_hook():
    assert ARCHITECTURE in model_loaders()


def test_greedy_and_sampled_batches_follow_the_chain(null_engine):
    vocab = 49152  # SmolLM2's tokenizer
    prompts = [[500, 600, 700 + i] for i in range(5)]
    for temperature in (0.0, 0.7):
        params = {"max_new_tokens": 6, "temperature": temperature, "ignore_eos": True}
        outs = null_engine.generate(input_ids=prompts, sampling_params=params)
        for prompt, out in zip(prompts, outs):
            assert out["output_ids"] == _chain(prompt[-1], 6, vocab), temperature
