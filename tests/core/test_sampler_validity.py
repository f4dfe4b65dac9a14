"""Greedy tokens and row validity come from one pass over the logits, with argmax's answer."""

from __future__ import annotations

import math

import torch

from plait.core.sampler import _greedy_and_valid


def test_one_pass_gives_argmax_and_flags_poisoned_rows():
    nan, inf = math.nan, math.inf
    logits = torch.tensor(
        [
            [1.0, 5.0, 5.0, 2.0],  # tie: the first maximum, like argmax
            [1.0, nan, 3.0, 0.0],  # NaN anywhere: invalid
            [-inf, -inf, -inf, -inf],  # nothing possible: invalid
            [1.0, inf, 2.0, 0.0],  # +inf swamps softmax: invalid
            [-inf, -2.0, -inf, -inf],
        ]
    )  # one possible token: valid
    greedy, ok = _greedy_and_valid(logits)
    assert ok == [True, False, False, False, True]
    assert [g for g, v in zip(greedy, ok) if v] == [1, 1]
    assert greedy[0] == int(logits[0].argmax())
