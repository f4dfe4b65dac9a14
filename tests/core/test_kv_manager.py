"""KVManager: match / admit / allocate (with eviction) / cache_unfinished / release, with the
radix cache and with the null cache, driven the way the scheduler drives it. ``forward``
below stands in for the model runner: it writes the new slots into the request's row."""

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from plait.core.kv_manager import KVManager, NullPrefixCache
from plait.core.memory import ReqToTokenPool, TokenSlotAllocator
from plait.core.radix_cache import RadixCache
from plait.core.request import Req
from plait.core.sampling_params import SamplingParams


def make(num_slots=64, page_size=1, rows=4, enable_cache=True, context=64):
    return KVManager.create(
        ReqToTokenPool(rows, context), TokenSlotAllocator(num_slots, page_size), enable_cache
    )


def new_req(ids, rid="r"):
    return Req(rid=rid, input_ids=list(ids), sampling=SamplingParams())


def forward(kv, req, n):
    """Allocate and "compute" the next n tokens of req; False when KV ran out."""
    slots = kv.alloc_extend(req, n)
    if slots is None:
        return False
    kv.req_pool.req_to_token[req.req_pool_idx, req.kv_len : req.kv_len + n] = slots.to(torch.int32)
    req.kv_len += n
    return True


def admit_and_prefill(kv, ids, rid="r"):
    req = new_req(ids, rid)
    assert kv.admit(req, kv.match(req))
    assert forward(kv, req, len(req.fill_ids) - req.kv_len)
    kv.cache_unfinished(req)
    return req


def row(kv, req, lo, hi):
    return kv.req_pool.req_to_token[req.req_pool_idx, lo:hi].tolist()


def all_free(kv):
    u = kv.usage()
    return u.free + u.cached == u.num_slots and kv.req_pool.available_size() == kv.req_pool.size


def test_transfer_reuses_the_cached_prefix_and_caches_the_prompt():
    """Disaggregated decode: only the tokens after the cached prefix get fresh slots; once
    they land the prompt is cached (a twin finds all but its last token); a failed transfer
    frees only the fresh slots, the prefix stays cached."""
    kv = make()
    kv.release(admit_and_prefill(kv, [1, 2, 3, 4, 5]))
    req = new_req([1, 2, 3, 4, 9, 8, 7])
    fresh, cached = kv.admit_for_transfer(req, 7)
    assert (cached, len(fresh)) == (4, 3)
    assert row(kv, req, 4, 7) == fresh.tolist()
    kv.transfer_done(req, 7)
    twin = new_req([1, 2, 3, 4, 9, 8, 7])
    assert kv.match(twin).length == 6
    kv.release(req)
    other = new_req([1, 2, 3, 4, 6, 6])
    fresh, cached = kv.admit_for_transfer(other, 6)
    assert (cached, len(fresh)) == (4, 2)
    kv.transfer_failed(other, fresh)
    assert kv.match(new_req([1, 2, 3, 4, 6, 6])).length == 4 and all_free(kv)


# ----- one request at a time -----


def test_fresh_manager_matches_nothing_and_everything_is_free():
    kv = make()
    assert kv.match(new_req([1, 2, 3])).length == 0
    assert kv.usage() == type(kv.usage())(num_slots=64, free=64, cached=0, evictable=0)
    assert kv.free_tokens() == 64


def test_cache_unfinished_hands_the_computed_prefix_to_the_cache_and_locks_it():
    kv = make()
    req = admit_and_prefill(kv, [1, 2, 3, 4, 5])
    assert req.cache_len == req.kv_len == 5
    u = kv.usage()
    assert (u.free, u.cached, u.evictable) == (59, 5, 0)  # cached and locked by req
    kv.release(req)
    assert req.req_pool_idx is None and req.last_node is None and req.kv_len == req.cache_len == 0
    assert kv.usage().evictable == 5 and all_free(kv)


def test_second_request_reuses_the_first_ones_slots():
    kv = make()
    a = admit_and_prefill(kv, [1, 2, 3, 4, 5], "a")
    first = row(kv, a, 0, 5)
    kv.release(a)
    b = new_req([1, 2, 3, 4, 9], "b")
    m = kv.match(b)
    assert m.slots.tolist() == first[:4]  # the last token is always computed
    assert kv.admit(b, m)
    assert b.kv_len == b.cache_len == 4 and row(kv, b, 0, 4) == first[:4]
    assert kv.usage().evictable == 1  # [5] only: b locks [1, 2, 3, 4]


def test_match_leaves_room_for_prompt_logprobs():
    kv = make()
    kv.release(admit_and_prefill(kv, list(range(10))))
    req = new_req(range(10))
    req.return_logprob, req.logprob_start_len = True, 3
    assert kv.match(req).length == 2  # logits are needed from position 2 on


def test_duplicates_computed_concurrently_are_freed_and_the_row_points_at_the_cache():
    kv = make()
    a, b = new_req([7] * 6, "a"), new_req([7] * 6, "b")
    for r in (a, b):  # both admitted before either is cached: neither matches
        assert kv.admit(r, kv.match(r)) and forward(kv, r, 6)
    kv.cache_unfinished(a)
    free_before = kv.usage().free
    kv.cache_unfinished(b)
    assert kv.usage().free == free_before + 6
    assert row(kv, b, 0, 6) == row(kv, a, 0, 6) and b.cache_len == 6
    kv.release(a)
    kv.release(b)
    assert all_free(kv)


def test_chunked_prefill_extends_the_locked_prefix_each_chunk():
    kv = make()
    req = new_req(range(1, 13))
    assert kv.admit(req, kv.match(req))
    for chunk in (5, 5, 2):
        assert forward(kv, req, chunk)
        kv.cache_unfinished(req)
        assert req.cache_len == req.kv_len and kv.usage().evictable == 0
    assert kv.usage().cached == 12
    kv.release(req)
    assert all_free(kv)


def test_admit_without_a_free_row_takes_nothing():
    kv = make(rows=1)
    a = admit_and_prefill(kv, [1, 2, 3], "a")
    b = new_req([1, 2, 3, 4], "b")
    before = kv.usage()
    assert not kv.admit(b, kv.match(b))
    assert b.req_pool_idx is None and kv.usage() == before
    kv.release(a)


# ----- allocation under pressure -----


def test_allocation_evicts_unlocked_cache_entries_then_retries():
    kv = make(num_slots=16)
    for i in range(4):  # four finished requests fill the pool with evictable entries
        kv.release(admit_and_prefill(kv, [10 * i + 1] * 4, str(i)))
    assert kv.usage().free == 0 and kv.free_tokens() == 16
    req = new_req([99] * 6)
    assert kv.admit(req, kv.match(req)) and forward(kv, req, 6)
    assert kv.usage().cached == 8  # the two least recently used entries were evicted
    assert kv.match(new_req([1] * 4 + [0])).length == 0
    assert kv.match(new_req([31] * 4 + [0])).length == 4


def test_allocation_returns_none_when_only_locked_entries_remain():
    kv = make(num_slots=16)
    admit_and_prefill(kv, list(range(1, 13)), "a")  # locked while running
    b = new_req([50] * 6, "b")
    assert kv.admit(b, kv.match(b))
    before = kv.usage()
    assert kv.alloc_extend(b, 6) is None
    assert kv.usage() == before  # nothing taken, nothing evicted
    assert kv.alloc_extend(b, 4) is not None


def test_paged_decode_allocation_is_all_or_nothing():
    ps = 4
    kv = make(num_slots=3 * ps, page_size=ps, enable_cache=False)
    a, b = new_req([1] * 4, "a"), new_req([2] * 3, "b")
    for r in (a, b):
        assert kv.admit(r, kv.match(r)) and forward(kv, r, len(r.input_ids))
    c = new_req([3] * 4, "c")  # takes the last free page
    assert kv.admit(c, kv.match(c)) and forward(kv, c, 4)
    assert kv.usage().free == 0
    # b's next token fits in its own page; a's full page needs a fresh one, which is not there
    assert kv.alloc_decode([b, a]) is None
    assert kv.usage().free == 0
    c_page = row(kv, c, 0, 1)[0] // ps
    kv.release(c)
    slots = kv.alloc_decode([b, a])
    assert slots.tolist() == [row(kv, b, 2, 3)[0] + 1, c_page * ps]


def test_paged_release_keeps_whole_pages_in_the_cache_and_frees_the_tail():
    ps = 4
    kv = make(num_slots=8 * ps, page_size=ps)
    req = admit_and_prefill(kv, range(1, 11))  # 2 whole pages + 2 tokens
    assert req.cache_len == 8 and req.kv_len == 10
    kv.release(req)
    assert kv.usage().cached == 8 and all_free(kv)


def test_release_all_frees_every_tail_in_one_allocator_call():
    """A step's finished requests (paged: each with a partial-page tail) are released
    together: the cache keeps their whole pages, the tails go back in one free (issue 41)."""
    ps = 4
    kv = make(num_slots=16 * ps, page_size=ps)
    reqs = [admit_and_prefill(kv, range(10 * i + 1, 10 * i + 11), str(i)) for i in range(3)]
    frees = []
    real = kv.allocator.free
    kv.allocator.free = lambda slots: (frees.append(slots.numel()), real(slots))
    kv.release_all(reqs)
    assert frees == [6]  # 2 tail slots each, one call
    assert kv.usage().cached == 24 and all_free(kv)
    assert all(r.req_pool_idx is None and r.kv_len == 0 for r in reqs)


# ----- the null cache and flush -----


def test_null_cache_keeps_everything_with_the_request_and_frees_it_on_release():
    kv = make(enable_cache=False)
    assert isinstance(kv.cache, NullPrefixCache)
    a = admit_and_prefill(kv, [1, 2, 3, 4, 5])
    assert a.cache_len == 0 and a.kv_len == 5
    assert kv.usage().free == 59 and kv.usage().cached == 0
    kv.release(a)
    assert kv.match(new_req([1, 2, 3, 4, 5])).length == 0
    assert kv.usage().free == 64 and all_free(kv)


def test_flush_returns_every_cached_slot():
    kv = make()
    assert isinstance(kv.cache, RadixCache)
    for i in range(3):
        kv.release(admit_and_prefill(kv, [i] * 7, str(i)))
    assert kv.usage().cached == 21
    kv.flush()
    assert kv.usage().free == 64 and kv.usage().cached == 0


def test_release_of_a_request_without_a_row_is_a_no_op():
    kv = make()
    req = new_req([1, 2])
    kv.release(req)
    assert all_free(kv) and kv.usage().free == 64


# ----- property-based: the scheduler's whole cycle, checked slot by slot -----


class KVManagerMachine(RuleBasedStateMachine):
    """Requests are admitted, prefilled in chunks, decoded, retracted when KV runs out and
    released in any order. After every step each allocatable page is in exactly one place:
    the free list, the cache, or one running request's own tail ``[cache_len, kv_len)``; and
    each running request's cached prefix is still in the cache, slot for slot."""

    page_size = 1
    num_slots = 40
    rows = 4
    enable_cache = True
    prompts = st.lists(st.integers(0, 2), min_size=1, max_size=12)

    @initialize()
    def setup(self):
        self.kv = make(self.num_slots, self.page_size, self.rows, self.enable_cache)
        self.running: list[Req] = []
        self.count = 0

    def out_of_kv(self, req):
        # allocation fails only after evicting everything it could
        assert self.kv.cache.evictable_size() == 0
        self.retract(req)

    def retract(self, req):
        self.kv.release(req)
        self.running.remove(req)

    def extend(self, req, n):
        if forward(self.kv, req, n):
            self.kv.cache_unfinished(req)
        else:
            self.out_of_kv(req)

    @rule(prompt=prompts, chunk=st.integers(1, 12))
    def admit(self, prompt, chunk):
        self.count += 1
        req = new_req(prompt, str(self.count))
        if not self.kv.admit(req, self.kv.match(req)):
            assert len(self.running) == self.rows
            return
        self.running.append(req)
        self.extend(req, min(chunk, len(req.fill_ids) - req.kv_len))

    @precondition(lambda self: any(r.kv_len < len(r.fill_ids) for r in self.running))
    @rule(chunk=st.integers(1, 12), data=st.data())
    def continue_prefill(self, chunk, data):
        pending = [r for r in self.running if r.kv_len < len(r.fill_ids)]
        req = data.draw(st.sampled_from(pending))
        self.extend(req, min(chunk, len(req.fill_ids) - req.kv_len))

    @precondition(lambda self: any(r.kv_len == len(r.fill_ids) for r in self.running))
    @rule(token=st.integers(0, 2))
    def decode(self, token):
        batch = [r for r in self.running if r.kv_len == len(r.fill_ids)]
        for req in batch:
            req.output_ids.append(token)  # sampled: its KV is the next forward's
        slots = self.kv.alloc_decode(batch)
        if slots is None:
            self.out_of_kv(min(batch, key=lambda r: len(r.output_ids)))
            return
        r2t = self.kv.req_pool.req_to_token
        for req, slot in zip(batch, slots.tolist()):
            r2t[req.req_pool_idx, req.kv_len] = slot
            req.kv_len += 1

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def release(self, data):
        self.retract(data.draw(st.sampled_from(self.running)))

    @rule()
    def release_all_and_flush(self):
        for req in list(self.running):
            self.retract(req)
        u = self.kv.usage()
        assert u.free + u.cached == self.num_slots and u.evictable == u.cached
        self.kv.flush()
        assert self.kv.usage().free == self.num_slots
        assert self.kv.req_pool.available_size() == self.rows

    # -- invariants --

    def cache_pages(self):
        cache = self.kv.cache
        if isinstance(cache, NullPrefixCache):
            return []
        return [
            p
            for n in cache._nodes()
            if n is not cache.root_node
            for p in (n.value[:: self.page_size] // self.page_size).tolist()
        ]

    @invariant()
    def every_page_is_in_exactly_one_place(self):
        ps, alloc = self.page_size, self.kv.allocator
        own = []
        for req in self.running:
            tail = self.kv.req_pool.req_to_token[req.req_pool_idx, req.cache_len : req.kv_len]
            own += sorted(set((tail.long() // ps).tolist()))
            assert req.cache_len % ps == 0
        cached = self.cache_pages()
        assert len(cached) == len(set(cached)) and len(own) == len(set(own))
        assert not set(own) & set(cached)
        assert not alloc._is_free[torch.tensor(own + cached, dtype=torch.int64)].any()
        assert alloc.available_size() // ps + len(own) + len(cached) == alloc.num_pages
        assert self.kv.req_pool.available_size() == self.rows - len(self.running)

    @invariant()
    def running_prefixes_stay_cached(self):
        for req in self.running:
            # decode steps are cached only on release, so the cache may lag kv_len
            assert req.cache_len <= req.kv_len if self.enable_cache else req.cache_len == 0
            slots, _ = self.kv.cache.match_prefix(req.fill_ids[: req.cache_len])
            assert (
                slots.tolist()
                == self.kv.req_pool.req_to_token[req.req_pool_idx, : req.cache_len].tolist()
            )


class PagedKVManagerMachine(KVManagerMachine):
    page_size = 4
    num_slots = 12 * 4


class NullCacheKVManagerMachine(KVManagerMachine):
    enable_cache = False


_settings = settings(max_examples=100, stateful_step_count=25, deadline=None)
TestKVManagerStateMachine = KVManagerMachine.TestCase
TestKVManagerStateMachine.settings = _settings
TestPagedKVManagerStateMachine = PagedKVManagerMachine.TestCase
TestPagedKVManagerStateMachine.settings = _settings
TestNullCacheKVManagerStateMachine = NullCacheKVManagerMachine.TestCase
TestNullCacheKVManagerStateMachine.settings = _settings


@pytest.mark.parametrize("enable_cache", [True, False])
def test_create_picks_the_cache(enable_cache):
    kv = make(enable_cache=enable_cache)
    assert isinstance(kv.cache, RadixCache if enable_cache else NullPrefixCache)
