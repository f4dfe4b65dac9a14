"""The greedy LM head (plait/backends/cpu/greedy_head.h): the token the float32 panel head's
logits would give, bit for bit, from a bfloat16 screen and exact recomputation of its
candidates; and its use by the engine for greedy-only decode batches."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import plait
from plait.backends.cpu import greedy_head
from plait.backends.cpu.greedy_head import GreedyHead
from plait.backends.cpu.linear import PackedLinear
from plait.backends.cpu.plugin import CpuOptions

pytestmark = [
    pytest.mark.skipif(
        shutil.which(os.environ.get("CXX", "c++")) is None,
        reason="no C++ compiler on this machine to build the kernel",
    ),
    pytest.mark.skipif(
        shutil.which(os.environ.get("CXX", "c++")) is not None and greedy_head.extension() is None,
        reason="the greedy head needs a CPU with AVX-512 BF16",
    ),
]


def head_for(w: torch.Tensor) -> PackedLinear:
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    return PackedLinear(linear, "panel")


def panel_argmax(head: PackedLinear, x: torch.Tensor) -> list[int]:
    """What the sampler takes from the panel head's logits: the first maximal index."""
    return head(x).max(dim=-1).indices.tolist()


@pytest.mark.parametrize("vocab,k", [(1000, 64), (49, 2), (4801, 576)])
@pytest.mark.parametrize("rows", [1, 7, 16, 19])
def test_tokens_are_the_float32_heads_argmax(vocab, k, rows):
    """Vocabularies within, at and past whole 48-column panels; rows within and across the
    8-row passes."""
    g = torch.Generator().manual_seed(vocab + k + rows)
    head = head_for(torch.randn(vocab, k, generator=g) * 0.05)
    x = torch.randn(rows, k, generator=g) * 3
    assert GreedyHead.for_head(head)(x).tokens == panel_argmax(head, x)


def test_near_ties_are_decided_in_float32_and_exact_ties_by_the_first_index():
    """Rows of W that differ below bfloat16's precision (the screen cannot tell them apart;
    float32 can), duplicated rows (an exact tie: the first index wins, as torch.max), and a
    zero hidden state (every logit 0: the whole vocabulary is a candidate)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 64, generator=g) * 0.05
    x = torch.randn(6, 64, generator=g)
    top = [int(i) for i in (x @ w.T).argmax(-1)]
    for r, t in enumerate(top):
        w[200 + r] = w[t] * (1 + 2**-20)  # a hair larger or smaller than row t
        w[250 + r] = w[t]  # a duplicate past it
    x = torch.cat([x, torch.zeros(1, 64)])
    head = head_for(w)
    got = GreedyHead.for_head(head)(x).tokens
    assert got == panel_argmax(head, x)
    assert got[-1] == 0


def test_a_token_bfloat16_ranks_lower_is_still_found():
    """Row 0 has the larger float32 logit, but rounded to bfloat16 (spacing 2^-7 at 1) it is
    the smaller one: (1.0039, 1.0039) rounds to (1, 1), (1.004, 1) to (1.0078, 1). Only the
    error bound keeps row 0 a candidate."""
    w = torch.tensor([[1.0039, 1.0039], [1.004, 1.0]] + [[-1.0, -1.0]] * 60)
    x = torch.ones(1, 2)
    head = head_for(w)
    assert panel_argmax(head, x) == [0]
    assert GreedyHead.for_head(head)(x).tokens == [0]


def test_rows_it_cannot_decide_fall_back_to_the_logits_rule():
    """A NaN or infinite hidden state: the kernel answers -1 for that row alone and the head
    takes the panel head's logits, which are not finite, so the token is None; the other rows
    keep their tokens."""
    g = torch.Generator().manual_seed(1)
    head = head_for(torch.randn(200, 32, generator=g))
    x = torch.randn(4, 32, generator=g)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    ext = greedy_head.extension()
    gh = GreedyHead.for_head(head)
    assert ext.argmax(x, gh.packed, gh.norms, head.packed_weight).tolist()[1:3] == [-1, -1]
    tokens = gh(x).tokens
    assert tokens[1] is None and tokens[2] is None
    assert [tokens[0], tokens[3]] == [panel_argmax(head, x)[i] for i in (0, 3)]


def test_bad_weights_and_inputs_are_errors():
    ext = greedy_head.extension()
    odd = head_for(torch.randn(50, 33))
    with pytest.raises(RuntimeError, match="K must be even"):
        ext.pack(odd.packed_weight, 50)
    head = head_for(torch.randn(50, 32))
    with pytest.raises(RuntimeError, match="V=100 does not match"):
        ext.pack(head.packed_weight, 100)
    bad = torch.randn(50, 32)
    bad[3, 3] = float("inf")
    with pytest.raises(RuntimeError, match="not finite"):
        ext.pack(head_for(bad).packed_weight, 50)
    packed, norms = ext.pack(head.packed_weight, 50)
    with pytest.raises(RuntimeError, match="x \\[B, K\\]"):
        ext.argmax(torch.randn(2, 30), packed, norms, head.packed_weight)
    assert GreedyHead.for_head(odd) is None  # odd K: no greedy head, full logits
    assert GreedyHead.for_head(torch.nn.Linear(32, 50)) is None  # not a panel head


PROMPTS = [[5, 6, 7], [100, 200, 300, 400, 500, 600, 700, 800, 900], [42] * 20, [5, 6, 7, 8]]


def test_engine_takes_greedy_tokens_from_the_head_and_logits_where_a_request_needs_them(
    make_tiny_model, monkeypatch
):
    """Greedy-only decode batches go through the greedy head; a batch with a request that
    needs logits (logprobs here, or sampling) computes them for all. Tokens are the same as
    with the head turned off, in both cases."""
    path = make_tiny_model("llama")
    calls = []
    real_call = GreedyHead.__call__
    monkeypatch.setattr(
        GreedyHead, "__call__", lambda self, h: calls.append(len(h)) or real_call(self, h)
    )
    params = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}

    def outputs(use_head: bool) -> tuple[list, list, list[int]]:
        with plait.Engine(
            model_path=path, max_total_tokens=512, backend_options=CpuOptions(greedy_head=use_head)
        ) as engine:
            plain = [
                o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=params)
            ]
            engine.flush_cache()
            plain_calls = len(calls)
            mixed = engine.generate(
                input_ids=PROMPTS,
                sampling_params=params,
                return_logprob=[False, True, False, False],
            )
            return plain, [o["output_ids"] for o in mixed], [plain_calls, len(calls)]

    plain, mixed, counts = outputs(True)
    assert counts[0] > 0, "greedy-only decode batches did not use the greedy head"
    assert counts[1] == counts[0], "a batch with a logprob request used the greedy head"
    calls.clear()
    plain_off, mixed_off, counts_off = outputs(False)
    assert counts_off == [0, 0]
    assert (plain, mixed) == (plain_off, mixed_off)
    assert plain == mixed
