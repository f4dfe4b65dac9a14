"""``logit_bias``: validated in ``SamplingParams``, added per row by the sampler before greedy
and sampling alike, and never served by a fused greedy head that would skip it. The real-model
checks (a bias forces or bans a token; unbiased neighbours in the batch are untouched) are the
slow tests at the end."""

from __future__ import annotations

import pytest
import torch

from plait.core.request import Req
from plait.core.sampler import sample, takes_plain_argmax
from plait.core.sampling_params import SamplingParams


def req(**sp) -> Req:
    return Req(rid="r", input_ids=[1, 2, 3], sampling=SamplingParams.from_dict(sp))


def test_keys_become_token_ids_and_an_empty_map_is_none():
    assert SamplingParams.from_dict({"logit_bias": {"7": 5, 9: -2.5}}).logit_bias == {7: 5, 9: -2.5}
    assert SamplingParams.from_dict({"logit_bias": {}}).logit_bias is None


@pytest.mark.parametrize(
    "bias",
    [
        {"7": 100.5},
        {"7": -101},
        {"7": float("nan")},
        {"7": float("inf")},
        {"-1": 1},
        {"x": 1},
        {"1.0": 1},
        {True: 1},
        {"7": "high"},
        {"7": True},
        [7, 1],
        "7",
    ],
)
def test_bad_bias_is_a_value_error_naming_logit_bias(bias):
    with pytest.raises(ValueError, match=r"^logit_bias"):
        SamplingParams.from_dict({"logit_bias": bias})


def test_token_outside_the_vocabulary_is_refused_when_the_vocabulary_is_known():
    sp = SamplingParams.from_dict({"logit_bias": {"99": 1}})
    sp.validate(vocab_size=100)
    with pytest.raises(ValueError, match=r"^logit_bias .*\[0, 99\)"):
        SamplingParams.from_dict({"logit_bias": {"99": 1}}).validate(vocab_size=99)


def test_a_biased_request_never_takes_the_fused_greedy_head():
    assert takes_plain_argmax(req(temperature=0))
    assert not takes_plain_argmax(req(temperature=0, logit_bias={"3": 1.0}))


def test_bias_moves_greedy_and_sampled_rows_and_leaves_the_others_alone():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    top = logits.argmax(dim=-1).tolist()
    reqs = [
        req(temperature=0),
        req(temperature=0, logit_bias={"11": 100}),
        req(temperature=0, logit_bias={str(top[2]): -100}),
        req(temperature=1.0, seed=1, logit_bias={"23": 100}),
    ]
    reqs[3].generator = torch.Generator().manual_seed(1)
    tokens = sample(logits.clone(), reqs, eos_ids=set())
    assert tokens[0] == top[0]
    assert tokens[1] == 11
    assert tokens[2] != top[2] and tokens[2] == int(logits[2].topk(2).indices[1])
    assert tokens[3] == 23  # +100 makes every other token's probability ~e^-100


def test_bias_cannot_reopen_a_masked_token():
    logits = torch.zeros(1, 10)
    r = req(
        temperature=0, min_new_tokens=1, stop_token_ids=[4], ignore_eos=True, logit_bias={"4": 100}
    )
    assert sample(logits, [r], eos_ids=set()) == [0]


# --------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def engine(smollm_dir):
    import plait

    with plait.Engine(model_path=str(smollm_dir), device="cpu", max_running_requests=8) as e:
        yield e


PROMPTS = ["The capital of France is", "My favourite colour is", "1, 2, 3, 4,"]
GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


@pytest.mark.slow
def test_real_model_bias_forces_bans_and_spares_its_neighbours(engine):
    alone = [engine.generate(prompt=p, sampling_params=GREEDY)["output_ids"] for p in PROMPTS]
    forced = 12345
    out = engine.generate(
        prompt=PROMPTS[0], sampling_params={**GREEDY, "logit_bias": {str(forced): 100}}
    )["output_ids"]
    assert out == [forced] * 6
    banned = engine.generate(
        prompt=PROMPTS[1], sampling_params={**GREEDY, "logit_bias": {str(alone[1][0]): -100}}
    )["output_ids"]
    assert banned[0] != alone[1][0]
    # one batch: the biased request beside two plain greedy ones, which stay token-identical
    mixed = engine.generate(
        prompt=PROMPTS,
        sampling_params=[GREEDY, {**GREEDY, "logit_bias": {str(forced): 100}}, GREEDY],
    )
    assert [o["output_ids"] for o in mixed] == [alone[0], [forced] * 6, alone[2]]
