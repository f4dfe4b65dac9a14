"""Scheduler behaviour seen through the Engine: prefix sharing, memory pressure, abort, and
that bad input is refused without harming other requests. Uses a tiny random model so the
numbers, not the model's wisdom, are under test."""

from __future__ import annotations

import threading
import time

import pytest

import plait
from plait.core.request import Req
from plait.core.sampling_params import SamplingParams

GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model("llama")


def kv_is_all_free(engine) -> bool:
    info = engine.get_server_info()
    return info["available_kv_tokens"] + info["cached_kv_tokens"] == info["max_total_tokens"]


@pytest.mark.parametrize("page_size", [1, 16])
def test_fork_like_workload_computes_shared_prefix_once(tiny, page_size):
    prefix = [(i * 7919) % 40000 + 100 for i in range(1000)]
    suffix_len = 12
    prompts = [prefix + [500 + b] * suffix_len for b in range(8)]
    with plait.Engine(tiny, page_size=page_size, chunked_prefill_size=256) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        computed = sum(
            o["meta_info"]["prompt_tokens"] - o["meta_info"]["cached_tokens"] for o in outs
        )
        assert computed <= 1000 + 8 * suffix_len + 8 + 8 * page_size
        assert engine.get_server_info()["prefill_tokens"] == computed


def test_radix_cache_disabled_computes_everything(tiny):
    prompts = [[7] * 200 + [b] for b in range(4)]
    with plait.Engine(tiny, disable_radix_cache=True) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert all(o["meta_info"]["cached_tokens"] == 0 for o in outs)
        assert engine.get_server_info()["cached_kv_tokens"] == 0
        assert kv_is_all_free(engine)


@pytest.mark.parametrize("page_size", [1, 16])
def test_memory_pressure_finishes_everything_with_same_output(tiny, page_size):
    prompts = [[(13 * b + i) % 3000 + 50 for i in range(40 + 5 * b)] for b in range(8)]
    params = {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}
    with plait.Engine(tiny, page_size=page_size) as roomy:
        want = [o["output_ids"] for o in roomy.generate(input_ids=prompts, sampling_params=params)]
    # room for about two requests at a time: forces queueing and retraction
    with plait.Engine(tiny, page_size=page_size, max_total_tokens=192) as tight:
        outs = tight.generate(input_ids=prompts, sampling_params=params)
        assert [o["output_ids"] for o in outs] == want
        assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
        assert kv_is_all_free(tight)
        assert tight.flush_cache()
        assert tight.get_server_info()["available_kv_tokens"] == 192


def test_retraction_happens_and_output_is_unchanged(tiny):
    prompts = [[100 + b] * 30 for b in range(6)]
    params = {"max_new_tokens": 60, "temperature": 0, "ignore_eos": True}
    with plait.Engine(tiny) as roomy:
        want = [o["output_ids"] for o in roomy.generate(input_ids=prompts, sampling_params=params)]
    with plait.Engine(tiny, max_total_tokens=256) as tight:
        tight.scheduler.new_token_ratio = tight.scheduler.config.min_new_token_ratio = 0.0
        outs = tight.generate(input_ids=prompts, sampling_params=params)
        assert [o["output_ids"] for o in outs] == want
        assert tight.get_server_info()["retractions"] > 0
        assert kv_is_all_free(tight)


def test_abort_frees_kv_and_finishes_with_abort(tiny):
    with plait.Engine(tiny) as engine:
        stream = engine.generate(
            input_ids=[5] * 20,
            rid="victim",
            stream=True,
            sampling_params={"max_new_tokens": 2000, "ignore_eos": True},
        )
        first = next(stream)
        assert first["meta_info"]["finish_reason"] is None
        engine.abort("victim")
        last = list(stream)[-1]
        assert last["meta_info"]["finish_reason"]["type"] == "abort"
        assert kv_is_all_free(engine)


def test_aborting_a_queued_request_that_holds_kv_frees_it(tiny):
    """A request re-queued with its KV (jump-forward tokens not yet extended) may be aborted
    there; its row and slots must come back."""
    with plait.Engine(tiny) as engine:
        s = engine.scheduler

        def hold_then_abort() -> bool:  # on the scheduler thread: no step in between
            req = Req(rid="held", input_ids=[5] * 20, sampling=SamplingParams(max_new_tokens=4))
            assert s.kv.admit(req, s.kv.match(req))
            assert s.kv.alloc_extend(req, 20) is not None
            req.kv_len = 20
            s.waiting.insert(0, req)
            return s.abort("held")

        assert engine._call(hold_then_abort)
        assert kv_is_all_free(engine)
        assert engine.get_server_info()["num_waiting_reqs"] == 0


def test_stream_closed_early_aborts_request(tiny):
    with plait.Engine(tiny) as engine:
        stream = engine.generate(
            input_ids=[5] * 20,
            stream=True,
            sampling_params={"max_new_tokens": 2000, "ignore_eos": True},
        )
        next(stream)
        stream.close()
        deadline = time.time() + 10
        while not kv_is_all_free(engine) and time.time() < deadline:
            time.sleep(0.05)
        assert kv_is_all_free(engine)
        assert engine.get_server_info()["num_running_reqs"] == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"sampling_params": {"temperature": -1}}, "temperature"),
        ({"sampling_params": {"max_new_tokens": -3}}, "max_new_tokens"),
        ({"sampling_params": {"top_p": 0}}, "top_p"),
        ({"sampling_params": {"n": 0}}, "n"),
        ({"sampling_params": {"bogus": 1}}, "bogus"),
        ({"sampling_params": {"max_new_tokens": 10**6}}, "max_new_tokens"),
        ({"input_ids": [1] * 3000}, "context length"),
        ({"input_ids": [10**7]}, "input_ids"),
        ({"input_ids": []}, "empty"),
        ({"logprob_start_len": -5}, "logprob_start_len"),
        ({"return_logprob": True, "top_logprobs_num": 10**6}, "top_logprobs_num"),
    ],
)
def test_bad_input_raises_value_error_naming_the_parameter(tiny, kwargs, name):
    with plait.Engine(tiny, context_length=2048) as engine:
        kwargs = {"input_ids": [1, 2, 3], **kwargs}
        with pytest.raises(ValueError, match=name):
            engine.generate(**kwargs)


def test_bad_request_does_not_disturb_running_ones(tiny):
    with plait.Engine(tiny) as engine:
        want = engine.generate(input_ids=[3, 4, 5], sampling_params=GREEDY)["output_ids"]
        results = []
        worker = threading.Thread(
            target=lambda: results.append(
                engine.generate(input_ids=[3, 4, 5], sampling_params=GREEDY)
            )
        )
        worker.start()
        for bad in ({"temperature": -1}, {"top_k": -7}, {"stop": [""]}):
            with pytest.raises(ValueError):
                engine.generate(input_ids=[3, 4, 5], sampling_params=bad)
        worker.join()
        assert results[0]["output_ids"] == want
        assert engine.generate(input_ids=[3, 4, 5], sampling_params=GREEDY)["output_ids"] == want


def test_prompt_larger_than_pool_is_rejected(tiny):
    with plait.Engine(tiny, max_total_tokens=64) as engine:
        with pytest.raises(ValueError, match="max_total_tokens"):
            engine.generate(input_ids=[1] * 100, sampling_params={"max_new_tokens": 1})


def test_bad_engine_arguments_name_the_parameter(tiny):
    for kwargs, name in [
        ({"page_size": 0}, "page_size"),
        ({"schedule_policy": "x"}, "schedule_policy"),
        ({"device": "nope"}, "device"),
        ({"dtype": "int8"}, "dtype"),
    ]:
        with pytest.raises(ValueError, match=name):
            plait.Engine(tiny, **kwargs)
