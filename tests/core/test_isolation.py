"""One request's sampling values can never hurt its batch neighbours (issue 16, items 1, 2, 8,
10): bad values are refused at the boundary, and a row whose distribution is still invalid
fails alone while its neighbours' tokens stay exactly what they were."""

from __future__ import annotations

import math
import time

import pytest
import torch

from plait.core.messages import GenerateReq
from plait.core.request import Req
from plait.core.sampler import sample
from plait.core.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "params,name",
    [
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": -1e-50}, "temperature"),
        ({"top_p": math.nan}, "top_p"),
        ({"min_p": math.inf}, "min_p"),
        ({"repetition_penalty": 1e-45}, "repetition_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"seed": 2**70}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63 - 1, "n": 2}, "seed"),
        ({"regex": "a" * (64 * 1024 + 1)}, "regex"),
    ],
)
def test_non_finite_and_out_of_range_values_are_refused_naming_the_parameter(params, name):
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict(params)
    assert str(err.value).startswith(name + " "), err.value


@pytest.mark.parametrize("t", [1e-50, 1e-40, 9e-6])
def test_a_temperature_below_epsilon_is_greedy(t):
    sp = SamplingParams.from_dict({"temperature": t})
    assert sp.temperature == 0.0 and sp.is_greedy
    assert SamplingParams.from_dict({"temperature": 1e-4}).temperature == 1e-4


def test_the_largest_seed_for_n_is_accepted():
    assert SamplingParams.from_dict({"seed": 2**63 - 2, "n": 2}).seed == 2**63 - 2


def _req(rid: str, **sp) -> Req:
    params = SamplingParams(**sp)  # the dataclass itself does not validate: worst case
    req = Req(rid=rid, input_ids=[1, 2, 3], sampling=params)
    req.generator = torch.Generator().manual_seed(7)
    return req


@pytest.mark.parametrize(
    "poison",
    [
        {"temperature": 1e-50},  # logits / 1e-50 -> inf -> NaN probs
        {"temperature": math.inf, "min_new_tokens": 4},
        {"repetition_penalty": 1e-45},
        {"temperature": math.nan},
    ],
)
def test_an_invalid_row_fails_alone_and_neighbours_are_unchanged(poison):
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 5
    neighbours = [{"temperature": 0.0}, {"temperature": 0.8, "top_p": 0.9}]

    def run(with_poison: bool) -> list:
        reqs = [_req("a", **neighbours[0]), _req("b", **neighbours[1])]
        rows = [logits[0], logits[2]]
        if with_poison:
            reqs.insert(1, _req("bad", **poison))
            rows.insert(1, logits[1])
        return sample(torch.stack(rows).clone(), reqs, eos_ids={0})

    alone = run(False)
    mixed = run(True)
    assert mixed[1] is None
    assert [mixed[0], mixed[2]] == alone


def test_a_row_without_any_possible_token_fails_alone():
    logits = torch.randn(2, 10)
    logits[0] = float("-inf")
    tokens = sample(
        logits.clone(), [_req("x", temperature=0.0), _req("y", temperature=0.0)], eos_ids=set()
    )
    assert tokens == [None, int(logits[1].argmax())]


@pytest.fixture(scope="module")
def tiny_engine(make_tiny_model):
    import plait

    torch.set_num_threads(1)
    engine = plait.Engine(model_path=make_tiny_model("llama"), device="cpu", max_total_tokens=2048)
    yield engine
    engine.shutdown()


def test_engine_finishes_a_poisoned_request_with_an_error_and_its_batch_is_unchanged(tiny_engine):
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    greedy = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    expected = tiny_engine.generate(input_ids=prompts, sampling_params=greedy)
    reqs = tiny_engine.make_requests(
        GenerateReq.batch(input_ids=prompts, sampling_params=greedy)[0]
    )
    poisoned = tiny_engine.make_requests(
        [GenerateReq(input_ids=[20, 21], sampling_params={"max_new_tokens": 6})]
    )
    poisoned[0].sampling.temperature = 1e-50  # past validation, as a bug might let it
    import queue

    done: queue.Queue = queue.Queue()
    tiny_engine.submit(reqs[:1] + poisoned + reqs[1:], lambda r, fin: done.put(r) if fin else None)
    finished = {}
    while len(finished) < 4:
        r = done.get(timeout=60)
        finished[r.rid] = r
    assert finished[poisoned[0].rid].finish_reason["type"] == "error"
    assert [finished[r.rid].output_ids for r in reqs] == [e["output_ids"] for e in expected]
    info = tiny_engine.get_server_info()
    assert info["num_running_reqs"] == 0
    assert info["available_kv_tokens"] + info["evictable_kv_tokens"] == info["max_total_tokens"]


def test_a_grammar_that_cannot_compile_in_time_is_a_value_error_and_others_still_compile(
    smollm_dir,
):
    from transformers import AutoTokenizer

    from plait.core.grammar import GrammarCompiler

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    slow = GrammarCompiler(tok, len(tok), compile_timeout=1e-4)
    with pytest.raises(ValueError, match=r"^regex did not compile within"):
        slow.compile("regex", "[a-z]{3,40}@[a-z]{2,30}\\.(com|org|net)")
    fast = GrammarCompiler(tok, len(tok), compile_timeout=30)
    assert fast.compile("regex", "(yes|no)") is not None
    deadline = time.monotonic() + 30  # the slow compile finishes in the background and is kept
    while slow.cache_size() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.cache_size() == 1


def test_a_huge_regex_repetition_is_refused_before_compiling(smollm_dir):
    from transformers import AutoTokenizer

    from plait.core.grammar import GrammarCompiler

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    compiler = GrammarCompiler(tok, len(tok))
    with pytest.raises(ValueError, match=r"^regex repetition count 3000001"):
        compiler.compile("regex", "a{3000001}")
    with pytest.raises(ValueError, match=r"^regex repetition count"):
        compiler.compile("regex", "b{2,20000}")
    assert compiler.compile("regex", "a{3,10}") is not None
