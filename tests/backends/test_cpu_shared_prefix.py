"""Extend attention over a prefix several requests share (plait.backends.cpu.shared_prefix):
the groups it forms, and that reading the shared keys once gives the reference's attention."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from plait.backends.cpu import cpp_build
from plait.backends.cpu.attention import extend_attention_ref
from plait.backends.cpu.shared_prefix import (
    MIN_SHARED,
    SharedGroup,
    extend_attention_shared,
    plan_shared_extend,
    shared_groups,
)

# the groups are formed by the decode kernel's rule (csrc/src/decode_attention.cpp)
pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="no C++ compiler on this machine to build the kernel",
)


def test_extend_and_decode_share_one_minimum_prefix():
    assert MIN_SHARED == cpp_build.extension().decode_attention.MIN_SHARED


def batch(
    seed: int,
    layout: list[tuple[str, int, int]],
    hkv: int = 3,
    group: int = 3,
    d: int = 64,
    shared_len: int = 300,
):
    """``layout``: per request (prefix owner, cached length, new tokens); owner "s" takes its
    first ``shared_len`` cached slots from one shared prefix, "o" has only its own."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(c + n for _, c, n in layout) + shared_len + 4
    perm = torch.randperm(total, generator=gen).int()
    shared, rest = perm[:shared_len], perm[shared_len:]
    r2t = torch.zeros(len(layout) + 1, 2048, dtype=torch.int32)
    used = 0
    for b, (owner, cached, new) in enumerate(layout):
        own = cached + new - (shared_len if owner == "s" else 0)
        row = (
            torch.cat([shared, rest[used : used + own]])
            if owner == "s"
            else rest[used : used + own]
        )
        used += own
        r2t[b + 1, : len(row)] = row
    k = torch.randn(total, hkv, d, generator=gen)
    v = torch.randn(total, hkv, d, generator=gen)
    q = torch.randn(sum(n for *_, n in layout), hkv * group, d, generator=gen)
    rows = list(range(1, len(layout) + 1))
    return q, k, v, r2t, rows, [c for _, c, _ in layout], [n for *_, n in layout]


@pytest.mark.parametrize(
    "layout,groups",
    [
        # the shared-prefix workload's second step: requests whose cached prefix is exactly the
        # shared one, new suffixes of equal and unequal lengths
        ([("s", 300, 32)] * 5 + [("s", 300, 7)], [SharedGroup(0, 6, 300)]),
        # cached tokens of their own past the shared part; an unshared request before and after
        (
            [("o", 50, 9), ("s", 310, 4), ("s", 340, 1), ("s", 300, 12), ("o", 0, 20)],
            [SharedGroup(1, 3, 300)],
        ),
        # one request alone on the prefix: nothing to share
        ([("s", 300, 5), ("o", 200, 5)], []),
    ],
)
def test_shared_prefix_extend_matches_the_reference(layout, groups):
    q, k, v, r2t, rows, prefix, ext = batch(0, layout)
    found = shared_groups([r2t[r, :p] for r, p in zip(rows, prefix)], prefix)
    assert found == groups
    want = extend_attention_ref(q, k, v, r2t, rows, prefix, ext, 0.125)
    plan = plan_shared_extend(r2t, rows, prefix, ext, found, q.shape[1] // k.shape[1])
    got = extend_attention_shared(q, k, v, plan, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("hkv,group,d", [(1, 4, 32), (2, 2, 128), (4, 1, 16)])
def test_head_layouts(hkv, group, d):
    layout = [("s", 300, 6), ("s", 305, 3), ("s", 300, 1)]
    q, k, v, r2t, rows, prefix, ext = batch(1, layout, hkv, group, d)
    found = shared_groups([r2t[r, :p] for r, p in zip(rows, prefix)], prefix)
    assert found == [SharedGroup(0, 3, 300)]
    torch.testing.assert_close(
        extend_attention_shared(
            q, k, v, plan_shared_extend(r2t, rows, prefix, ext, found, group), 0.3
        ),
        extend_attention_ref(q, k, v, r2t, rows, prefix, ext, 0.3),
        rtol=1e-5,
        atol=2e-6,
    )


def test_a_short_common_prefix_forms_no_group():
    layout = [("s", MIN_SHARED - 1, 4), ("s", MIN_SHARED - 1, 4)]
    q, k, v, r2t, rows, prefix, ext = batch(2, layout, shared_len=MIN_SHARED - 1)
    assert shared_groups([r2t[r, :p] for r, p in zip(rows, prefix)], prefix) == []
