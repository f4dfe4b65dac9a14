"""``KVManager.concat_and_append``: fork branches' cached KV joined into one cached sequence
(``join(mode="concate_and_append")``), with slots copied, never recomputed."""

import pytest
import torch

from plait.core.kv_manager import KVManager
from plait.core.memory import ReqToTokenPool, TokenSlotAllocator
from plait.core.request import Req
from plait.core.sampling_params import SamplingParams


def make(num_slots=64, page_size=1):
    return KVManager.create(ReqToTokenPool(4, 64), TokenSlotAllocator(num_slots, page_size))


def cache(kv, ids, buffers):
    """Prefill ``ids`` as the scheduler would, writing each token's id into its KV slot, and
    finish the request (its KV stays in the cache)."""
    req = Req(rid="r", input_ids=list(ids), sampling=SamplingParams())
    assert kv.admit(req, kv.match(req))
    n = len(ids) - req.kv_len
    slots = kv.alloc_extend(req, n)
    kv.req_pool.req_to_token[req.req_pool_idx, req.kv_len : req.kv_len + n] = slots.to(torch.int32)
    for buf in buffers:
        buf[slots] = torch.tensor(ids[req.kv_len :], dtype=buf.dtype)
    req.kv_len += n
    kv.release(req)


def test_branches_join_into_one_cached_sequence_with_their_own_kv():
    kv = make()
    buffers = [torch.zeros(64 + 1), torch.zeros(64 + 1)]  # "K" and "V": slot -> token id
    prefix, a, b, c = [1, 2, 3], [1, 2, 3, 10, 11], [1, 2, 3, 20], [1, 2, 3, 30, 31, 32]
    for ids in (prefix, a, b, c):
        cache(kv, ids, buffers)
    cached_before, free_before = kv.usage().cached, kv.usage().free
    joined = kv.concat_and_append(prefix, [a, b, c], buffers)
    assert joined == [1, 2, 3, 10, 11, 20, 30, 31, 32]
    slots, _ = kv.cache.match_prefix(joined)
    assert len(slots) == len(joined)  # all of it cached now
    for buf in buffers:  # every slot holds the KV its branch computed for that token
        assert buf[slots].tolist() == joined
    usage = kv.usage()
    assert usage.cached == cached_before + 4  # b's and c's segments: copied, a's: shared
    assert usage.free == free_before - 4
    assert usage.evictable == usage.cached  # no lock left behind
    again = kv.concat_and_append(prefix, [a, b, c], buffers)  # the same join: nothing new
    assert again == joined and kv.usage().cached == usage.cached
    assert kv.usage().free == usage.free


def test_refuses_what_it_cannot_join():
    kv = make()
    buffers = [torch.zeros(65)]
    cache(kv, [1, 2, 3, 4], buffers)
    with pytest.raises(ValueError, match="branch 1 does not extend"):
        kv.concat_and_append([1, 2], [[1, 2, 3, 4], [9, 2, 5]], buffers)
    with pytest.raises(ValueError, match=r"branch 1's KV is no longer cached \(2 of 3"):
        kv.concat_and_append([1, 2], [[1, 2, 3, 4], [1, 2, 7]], buffers)
    assert kv.usage().evictable == kv.usage().cached
    paged = make(page_size=4)
    with pytest.raises(ValueError, match="page_size 1"):
        paged.concat_and_append([1], [[1, 2]], buffers)
