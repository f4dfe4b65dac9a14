"""The core's request messages: SGLang's batch form, n expansion, and each rule naming its
parameter. No model: these run in milliseconds."""

from __future__ import annotations

import pickle

import pytest

from plait.core.messages import GenerateReq, RequestLimits, check_sequences
from plait.frontend.backends.endpoint import generate_body

LIMITS = RequestLimits(context_len=160, vocab_size=100, max_total_tokens=150)


def test_batch_spreads_scalars_and_keeps_per_prompt_lists():
    msgs, batched = GenerateReq.batch(
        input_ids=[[1, 2], [3]],
        rid="r",
        sampling_params=[{"max_new_tokens": 2}, None],
        return_logprob=[True, None],
    )
    assert batched and [m.input_ids for m in msgs] == [[1, 2], [3]]
    assert [m.rid for m in msgs] == ["r-0", "r-1"]
    assert [m.sampling_params.max_new_tokens for m in msgs] == [2, 128]
    assert [m.return_logprob for m in msgs] == [True, False]
    single, batched = GenerateReq.batch(text="hi")
    assert not batched and single[0].text == "hi"


@pytest.mark.parametrize(
    "values, param",
    [
        ({}, "text"),
        ({"text": "a", "input_ids": [1]}, "text"),
        ({"text": []}, "text"),
        ({"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params"),
        ({"text": "a", "colour": 1}, "colour"),
        ({"text": "a", "sampling_params": {"top_p": 5}}, "top_p"),
    ],
)
def test_batch_refuses_bad_shapes_naming_the_parameter(values, param):
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        GenerateReq.batch(**values)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"input_ids": []}, "prompt"),
        ({"input_ids": [1, 100]}, "input_ids"),
        ({"input_ids": [1] * 160}, "prompt"),
        ({"input_ids": [1] * 8, "sampling_params": {"max_new_tokens": 153}}, "max_new_tokens"),
        ({"input_ids": [1] * 150, "sampling_params": {"max_new_tokens": 1}}, "prompt"),
        ({"input_ids": [1, 2], "logprob_start_len": 3}, "logprob_start_len"),
        ({"input_ids": [1, 2], "top_logprobs_num": 101}, "top_logprobs_num"),
        ({"input_ids": [1], "sampling_params": {"stop_token_ids": [100]}}, "stop_token_ids"),
    ],
)
def test_validate_names_the_parameter(fields, param):
    msg = GenerateReq(**fields)
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        msg.validate(LIMITS)


def test_unknown_limits_are_not_checked():
    GenerateReq(input_ids=[10**6] * 50).validate(RequestLimits())


def test_a_servers_bounds_on_work_per_request():
    capped = RequestLimits(vocab_size=100, max_top_logprobs=20, max_sequences=6)
    GenerateReq(input_ids=[1], top_logprobs_num=20).validate(capped)
    with pytest.raises(ValueError, match=r"^top_logprobs_num .*\[0, 20\]"):
        GenerateReq(input_ids=[1], top_logprobs_num=21).validate(capped)
    GenerateReq(input_ids=[1], top_logprobs_num=21).validate(LIMITS)  # the vocab bounds it
    msgs, _ = GenerateReq.batch(input_ids=[[1], [2]], sampling_params={"n": 3})
    check_sequences(msgs, capped)
    check_sequences(msgs + msgs, LIMITS)  # unset: not checked
    with pytest.raises(ValueError, match=r"^n: the request asks for 12 sequences"):
        check_sequences(msgs + msgs, capped)


def test_tokenized_encodes_text_once():
    msg = GenerateReq(text="abc").tokenized(lambda t: [ord(c) for c in t])
    assert msg.input_ids == [97, 98, 99] and msg.text is None
    assert msg.tokenized(lambda t: pytest.fail("encoded twice")) is msg


def test_expand_gives_each_sample_its_rid_and_seed():
    msg = GenerateReq(input_ids=[1], rid="x", sampling_params={"n": 3, "seed": 7})
    samples = msg.expand()
    assert [s.rid for s in samples] == ["x-0", "x-1", "x-2"]
    assert [s.sampling_params.seed for s in samples] == [7, 8, 9]
    assert all(s.sampling_params.n == 1 for s in samples)
    assert msg.sampling_params.n == 3  # the original is untouched
    (one,) = GenerateReq(input_ids=[1]).expand()
    assert one.rid  # a fresh rid when none was given


def test_messages_survive_pickling_as_they_are():
    msg = GenerateReq(
        input_ids=[1, 2], rid="r", sampling_params={"regex": "a+"}, return_logprob=True
    )
    assert pickle.loads(pickle.dumps(msg)) == msg


def test_grammar_syntax_is_checked_without_a_compiler():
    with pytest.raises(ValueError, match="^regex"):
        GenerateReq(
            input_ids=[1], sampling_params={"regex": "(a"}
        ).sampling_params.check_grammar_syntax()
    with pytest.raises(ValueError, match="^json_schema"):
        GenerateReq(
            input_ids=[1], sampling_params={"json_schema": "[1"}
        ).sampling_params.check_grammar_syntax()


def test_endpoint_body_is_sglangs_generate_form():
    one = generate_body([GenerateReq(text="a", sampling_params={"max_new_tokens": 0})])
    assert one == {"text": "a", "sampling_params": {"max_new_tokens": 0}}
    many = generate_body(
        [
            GenerateReq(text=t, return_logprob=True, logprob_start_len=s)
            for t, s in (("a", 0), ("b", 1))
        ]
    )
    assert many == {
        "text": ["a", "b"],
        "sampling_params": {},
        "return_logprob": True,
        "logprob_start_len": [0, 1],
    }
