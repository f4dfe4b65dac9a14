"""Cache-aware scheduling: the ``lpm`` order of the waiting queue and in-batch prefix dedup.

Pinned twice: at the scheduler's admission (``Scheduler._schedule_prefill`` over a real
KVManager and radix cache; admission never runs the model, so the runner is a stand-in that
is never called) and through ``plait.Engine`` with a tiny random model, where each feature must
show in the prompt tokens served from the cache.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import plait
from plait.core.kv_manager import KVManager
from plait.core.memory import ReqToTokenPool, TokenSlotAllocator
from plait.core.model_runner import ExtendItem
from plait.core.schedule_policy import IN_BATCH_DEDUP_THRESHOLD, order_waiting
from plait.core.scheduler import Scheduler, SchedulerConfig
from tests.core.test_kv_manager import admit_and_prefill, all_free, new_req

PREFIX = list(range(100, 164))  # 64 tokens, longer than the dedup threshold


def make_scheduler(policy: str = "lpm", max_prefill_tokens: int = 8192) -> Scheduler:
    kv = KVManager.create(ReqToTokenPool(8, 512), TokenSlotAllocator(2048), enable_cache=True)
    runner = SimpleNamespace(device=torch.device("cpu"))  # admission never calls it
    return Scheduler(
        runner,
        kv,
        SimpleNamespace(eos_ids={2}),
        SchedulerConfig(
            schedule_policy=policy, overlap=False, max_prefill_tokens=max_prefill_tokens
        ),
    )


def cache(kv: KVManager, ids: list[int]) -> None:
    """Leave ``ids`` in the radix cache, as a finished request would."""
    kv.release(admit_and_prefill(kv, ids, rid="warm"))


def computed(kv: KVManager, items: list[ExtendItem]) -> None:
    """What the forward and ``_plan_extend`` do for admitted items: the KV is written and the
    computed prefix enters the cache (other requests can match it from the next step on)."""
    for it in items:
        req = it.req
        kv.req_pool.req_to_token[req.req_pool_idx, it.start : it.start + it.length] = it.slots.to(
            torch.int32
        )
        req.kv_len = it.start + it.length
        kv.cache_unfinished(req)


def admitted(items: list[ExtendItem]) -> list[str]:
    return [it.req.rid for it in items]


# ----- lpm: the queue ordered by cached prefix -----


def test_lpm_orders_the_queue_by_cached_prefix_and_fcfs_keeps_arrival_order():
    kv = make_scheduler().kv
    cache(kv, PREFIX + [7, 7, 7])
    waiting = [
        new_req(range(1000, 1080), "none"),
        new_req(PREFIX[:40] + [9] * 30, "short"),
        new_req(PREFIX + [8] * 10, "long"),
        new_req(range(2000, 2020), "none2"),
    ]
    assert [r.rid for r in order_waiting(waiting, "lpm", kv)] == [
        "long",
        "short",
        "none",
        "none2",
    ]  # ties: arrival
    assert [r.rid for r in order_waiting(waiting, "fcfs", kv)] == [r.rid for r in waiting]
    with pytest.raises(ValueError, match="^schedule_policy must be one of"):
        order_waiting(waiting, "sjf", kv)


@pytest.mark.parametrize("policy, first", [("lpm", "hit"), ("fcfs", "miss")])
def test_admission_follows_the_policy_when_the_budget_fits_one(policy, first):
    """A prefill budget of 100 tokens: the cache hit (16 new tokens) and the miss (90) do not
    both fit. lpm admits the hit, on its cached 64 tokens; fcfs admits whoever came first."""
    s = make_scheduler(policy, max_prefill_tokens=100)
    cache(s.kv, PREFIX)
    s.add_request(new_req(range(1000, 1090), "miss"))
    s.add_request(new_req(PREFIX + [5] * 16, "hit"))
    items = s._schedule_prefill()
    assert admitted(items) == [first]
    if first == "hit":
        assert (items[0].start, items[0].length) == (len(PREFIX), 16)
        assert s.stats.cached_tokens == len(PREFIX)
    assert [r.rid for r in s.waiting] == ["miss" if first == "hit" else "hit"]


# ----- in-batch prefix dedup -----


def test_requests_sharing_an_uncached_prefix_compute_it_once():
    """Three requests share 64 uncached tokens: the first computes them, the other two wait
    one step and then reuse them from the cache; an unrelated request is not held back."""
    s = make_scheduler()
    for rid, tail in (("a", [1] * 8), ("b", [2] * 8), ("other", None), ("c", [3] * 8)):
        s.add_request(new_req(PREFIX + tail if tail else range(3000, 3040), rid))
    first = s._schedule_prefill()
    assert admitted(first) == ["a", "other"]
    assert [r.rid for r in s.waiting] == ["b", "c"]
    computed(s.kv, first)
    second = s._schedule_prefill()
    assert admitted(second) == ["b", "c"]
    assert [(it.start, it.length) for it in second] == [(len(PREFIX), 8)] * 2
    computed(s.kv, second)
    for req in (it.req for it in first + second):
        s.kv.release(req)
    assert all_free(s.kv)


def test_short_shared_prefixes_and_cached_ones_are_not_deferred():
    """Deferring pays only for what it saves: a shared uncached stretch shorter than the
    threshold, or one the cache already holds, is admitted at once."""
    short = list(range(500, 500 + IN_BATCH_DEDUP_THRESHOLD - 1))
    s = make_scheduler()
    s.add_request(new_req(short + [1] * 8, "a"))
    s.add_request(new_req(short + [2] * 8, "b"))
    assert admitted(s._schedule_prefill()) == ["a", "b"]

    s = make_scheduler()
    cache(s.kv, PREFIX)
    s.add_request(new_req(PREFIX + [1] * 8, "a"))
    s.add_request(new_req(PREFIX + [2] * 8, "b"))
    assert admitted(s._schedule_prefill()) == ["a", "b"]


# ----- through the engine -----


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model("llama")


def test_engine_batch_with_a_shared_prefix_computes_it_once(tiny):
    """Eight prompts sharing 256 tokens arrive together, unchunked, with room to admit all
    at once: without dedup each would compute the prefix (8 x 264 tokens)."""
    prefix = [(i * 7919) % 40000 + 100 for i in range(256)]
    prompts = [prefix + [500 + b] * 8 for b in range(8)]
    with plait.Engine(tiny) as engine:
        outs = engine.generate(
            input_ids=prompts, sampling_params={"max_new_tokens": 2, "temperature": 0}
        )
        computed_tokens = engine.get_server_info()["prefill_tokens"]
        assert computed_tokens == sum(
            o["meta_info"]["prompt_tokens"] - o["meta_info"]["cached_tokens"] for o in outs
        )
        assert computed_tokens <= 256 + 8 * 8 + 8  # one prefix, the suffixes, and slack


@pytest.mark.parametrize("policy", ["lpm", "fcfs"])
def test_engine_lpm_serves_the_warm_prefix_before_other_requests_evict_it(tiny, policy):
    """A pool of 384 tokens holds a warm 192-token prefix; two unrelated 200-token prompts
    and one that extends the prefix arrive together, one running at a time. Under lpm the
    extension runs first and reuses the whole prefix; under fcfs the unrelated prompts run
    first and their KV evicts it."""
    prefix = [(i * 7919) % 40000 + 100 for i in range(192)]
    params = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
    with plait.Engine(
        tiny, max_total_tokens=384, max_running_requests=1, schedule_policy=policy
    ) as engine:
        engine.generate(input_ids=prefix + [9], sampling_params=params)
        outs = engine.generate(
            input_ids=[
                [3000 + i for i in range(200)],
                [5000 + i for i in range(200)],
                prefix + [11] * 8,
            ],
            sampling_params=params,
        )
        hit = outs[2]["meta_info"]["cached_tokens"]
        if policy == "lpm":
            assert hit == len(prefix)
        else:
            assert hit < len(prefix)  # the contrast that makes the lpm case mean something
