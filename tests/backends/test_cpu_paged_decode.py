"""The CPU backend's in-place paged decode attention (csrc/src/decode_attention.cpp) computes what the
torch reference computes, over shapes, GQA ratios, ragged lengths and scattered slots; the CPU
backend uses it for float32 KV and keeps the torch path for other dtypes."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plait.backends.cpu import cpp_build
from plait.backends.cpu.attention import TorchAttentionBackend, decode_attention_ref
from plait.backends.cpu.paged_decode import PagedDecodeAttentionBackend, paged_decode_attention
from plait.backends.cpu.plugin import CpuBackend

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="no C++ compiler on this machine to build the kernel",
)


def case(seed: int, batch: int, hkv: int, group: int, d: int, max_len: int):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (batch,), generator=gen)
    num_slots = int(lens.sum()) + 7
    k = torch.randn(num_slots, hkv, d, generator=gen)
    v = torch.randn(num_slots, hkv, d, generator=gen)
    q = torch.randn(batch, hkv * group, d, generator=gen)
    # each request's slots scattered over the pool (a permutation), rows padded with junk
    perm = torch.randperm(num_slots, generator=gen)
    req_to_token = torch.full((batch + 2, max_len), 10**6, dtype=torch.int32)
    start = 0
    for b, n in enumerate(lens.tolist()):
        req_to_token[b + 2, :n] = perm[start : start + n].int()
        start += n
    rows = torch.arange(2, batch + 2)
    return q, k, v, req_to_token, rows, lens


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 9),
    hkv=st.integers(1, 4),
    group=st.sampled_from([1, 2, 3, 4, 5, 7]),
    d=st.sampled_from([8, 16, 64, 80, 72, 128]),
    max_len=st.integers(1, 300),
    sharpness=st.sampled_from([0.1, 1.0, 8.0]),
)
def test_kernel_matches_the_torch_reference(seed, batch, hkv, group, d, max_len, sharpness):
    """Lengths past one 32-token block and one run (a request is split over threads when
    there are few), head sizes that are not a multiple of the 16-float vectors, head sizes 64
    and 128 (the register kernel, its query heads taken 4 or 2 at a time, so groups of 5 and 7
    leave a remainder), and scores from flat to peaked (most exps underflow) all agree with
    the reference."""
    q, k, v, req_to_token, rows, lens = case(seed, batch, hkv, group, d, max_len)
    scale = d**-0.5 * sharpness
    want = decode_attention_ref(q, k, v, req_to_token, rows, lens, scale)
    slots = req_to_token[rows, : int(lens.max())].long()
    got = paged_decode_attention(q, k, v, slots, lens.long(), scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_long_request_split_over_threads_matches_the_reference(threads):
    q, k, v, req_to_token, rows, lens = case(3, 1, 3, 3, 64, 1)
    gen = torch.Generator().manual_seed(4)
    n = 1000
    k = torch.randn(n + 5, 3, 64, generator=gen)
    v = torch.randn(n + 5, 3, 64, generator=gen)
    slots = torch.randperm(n + 5, generator=gen)[:n].long()[None]
    req_to_token = slots.int()
    lens = torch.tensor([n])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = paged_decode_attention(q, k, v, slots, lens, 0.125)
    finally:
        torch.set_num_threads(before)
    want = decode_attention_ref(q, k, v, req_to_token, torch.tensor([0]), lens, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_lengths_and_slots_are_errors_not_reads_out_of_bounds():
    q, k, v, req_to_token, rows, lens = case(0, 2, 1, 2, 8, 5)
    slots = req_to_token[rows, : int(lens.max())].long()
    with pytest.raises(RuntimeError, match="bad seq_len"):
        paged_decode_attention(q, k, v, slots, torch.tensor([0, 1]), 1.0)
    with pytest.raises(RuntimeError, match="slot out of range"):
        paged_decode_attention(
            q, k, v, torch.full_like(slots, k.shape[0]), torch.ones(2, dtype=torch.int64), 1.0
        )


@pytest.mark.parametrize(
    "dtype,cls",
    [
        (torch.float32, PagedDecodeAttentionBackend),
        (torch.bfloat16, PagedDecodeAttentionBackend),
        (torch.float16, TorchAttentionBackend),
    ],
)
def test_cpu_backend_picks_the_kernel_for_float32_and_bfloat16_kv(dtype, cls):
    backend = CpuBackend()
    pool = backend.create_kv_pool(16, 1, 1, 8, dtype, 1)
    assert type(backend.create_attention_backend(pool, 2, 1, 8)) is cls


def shared_prefix_case(
    seed: int,
    prefix: int,
    tails: list[int],
    lead: int = 0,
    hkv: int = 3,
    group: int = 3,
    d: int = 64,
):
    """Requests sharing one prefix of ``prefix`` slots (tails[b] own slots each), after
    ``lead`` requests of their own; slots scattered over the pool."""
    gen = torch.Generator().manual_seed(seed)
    lens = [lead_len for lead_len in [40] * lead] + [prefix + t for t in tails]
    num_slots = prefix + sum(lens) + 5
    perm = torch.randperm(num_slots, generator=gen)
    shared, rest = perm[:prefix], perm[prefix:]
    rows, used = [], 0
    for b, n in enumerate(lens):
        own = n - prefix if b >= lead else n
        mine = rest[used : used + own]
        used += own
        rows.append(torch.cat([shared, mine]) if b >= lead else mine)
    width = max(lens) + 3
    slots = torch.zeros(len(lens), width, dtype=torch.int64)
    for b, r in enumerate(rows):
        slots[b, : len(r)] = r
    k = torch.randn(num_slots, hkv, d, generator=gen)
    v = torch.randn(num_slots, hkv, d, generator=gen)
    q = torch.randn(len(lens), hkv * group, d, generator=gen)
    return q, k, v, slots, torch.tensor(lens)


@pytest.mark.parametrize(
    "prefix,tails,lead,hkv,group,d",
    [
        (1000, [1] * 32, 0, 3, 3, 64),  # the shared-prefix workload: 32 requests, 1 new token
        (300, [1, 5, 40, 2], 2, 3, 3, 64),  # ragged tails, after two unshared requests
        (129, [1, 1, 1], 0, 2, 4, 128),  # just past the threshold; head_dim 128
        (200, [3, 7], 1, 1, 2, 80),  # head_dim 80: the generic path
        (150, [2, 1, 3], 0, 2, 3, 64),  # 9 query rows a KV head: two passes of 4, one left
        (140, [1, 2, 1], 0, 1, 3, 128),  # 9 rows, passes of 2 at head_dim 128, one left
    ],
)
def test_requests_sharing_a_prefix_read_it_once_and_match_the_reference(
    prefix, tails, lead, hkv, group, d
):
    ext = cpp_build.extension().decode_attention
    q, k, v, slots, lens = shared_prefix_case(0, prefix, tails, lead, hkv, group, d)
    # the grouping the kernel uses: the sharers, their common length one short of the shortest
    # (a request always keeps a tail of its own)
    assert ext.shared_groups(slots, lens) == [(lead, len(tails), prefix)]
    got = paged_decode_attention(q, k, v, slots, lens, 0.125)
    want = decode_attention_ref(q, k, v, slots.int(), torch.arange(len(lens)), lens, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_a_common_prefix_shorter_than_the_threshold_is_not_shared():
    ext = cpp_build.extension().decode_attention
    q, k, v, slots, lens = shared_prefix_case(1, 127, [1, 1], 0)
    assert ext.shared_groups(slots, lens) == []
    torch.testing.assert_close(
        paged_decode_attention(q, k, v, slots, lens, 0.125),
        decode_attention_ref(q, k, v, slots.int(), torch.arange(2), lens, 0.125),
        rtol=1e-5,
        atol=2e-6,
    )
