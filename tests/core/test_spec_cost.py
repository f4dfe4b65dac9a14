"""Speculation's cost model (``plait.core.spec.cost``): drafts only where they pay at the batch
size, from pass times measured online; the verify pass's shape on the CPU."""

from __future__ import annotations

import pytest

import plait
from plait.core.spec.cost import PROBE_EVERY, PassCost, draft_cap, probe
from plait.core.spec.ngram import DraftState


def _cost(points: dict[int, float]) -> PassCost:
    cost = PassCost()
    for n, s in points.items():
        for _ in range(3):
            cost.observe(n, s)
    return cost


def test_pass_cost_fits_a_line_through_the_sizes_seen():
    cost = PassCost()
    cost.observe(16, 0.4)
    assert cost.fit() is None  # one size: nothing to fit
    cost.observe(128, 1.6)
    fixed, per_token = cost.fit()  # type: ignore[misc]
    assert per_token == pytest.approx(1.2 / 112)
    assert fixed == pytest.approx(0.4 - 16 * 1.2 / 112)
    # a slower pass moves its size's time a little, a faster one all the way
    cost.observe(128, 2.6)
    assert cost.fit()[1] == pytest.approx(1.3 / 112)  # type: ignore[index]
    cost.observe(128, 1.5)
    assert cost.fit()[1] == pytest.approx(1.1 / 112)  # type: ignore[index]
    # one slow size does not tilt the line (a descheduled pass)
    cost.observe(64, 30.0)
    cost.observe(32, 0.4 + 16 * 1.1 / 112)
    assert cost.fit()[1] == pytest.approx(1.1 / 112)  # type: ignore[index]
    # times that fall with size mean nothing costs per token: no cap from the fit
    flat = _cost({1: 0.5, 64: 0.4})
    assert flat.fit() == (pytest.approx(0.45), 0.0)
    assert draft_cap(flat, 0.1, 16, 7) == 7


def test_drafts_pay_at_batch_1_and_only_when_likely_at_batch_16():
    cost = _cost({16: 0.4, 128: 1.6})  # this machine's batch-16 shape: per-token dominated
    assert draft_cap(PassCost(), 0.1, 16, 7) == 7  # nothing timed yet: no cap
    assert draft_cap(cost, 0.8, 1, 7) == 7  # batch 1: the pass's fixed cost dominates
    assert draft_cap(cost, 0.5, 1, 7) == 4
    assert draft_cap(cost, 0.95, 16, 7) == 7
    assert draft_cap(cost, 0.6, 16, 7) == 1
    assert draft_cap(cost, 0.3, 16, 7) == 0  # a plain decode row this pass
    assert draft_cap(cost, 0.95, 16, 3) == 3  # never past the proposer's budget
    compute_only = _cost({1: 0.01, 100: 1.0})  # no fixed cost: no draft ever pays
    assert draft_cap(compute_only, 0.95, 1, 7) == 0


def test_acceptance_estimate_follows_recent_verify_passes():
    s = DraftState(budget=7)
    start = s.acceptance()
    assert start == pytest.approx(0.8)
    s.record(7, 7, max_drafts=7)
    assert s.acceptance() > start
    for _ in range(6):
        s.record(3, 0, max_drafts=7)
    assert s.acceptance() < 0.5
    s.record(0, 0, max_drafts=7)  # a plain decode step says nothing about drafts
    low = s.acceptance()
    s.record(0, 0, max_drafts=7)
    assert s.acceptance() == low


def test_a_machine_where_drafts_never_pay_decodes_plainly_with_the_same_output(
    make_tiny_model,
):
    """Pass times that are all per-token (no fixed cost) cap every draft at 0: no verify
    pass runs, and the output is what speculation and plain decoding both give."""
    path = make_tiny_model("llama")
    ids = [5, 6, 7, 8] * 6
    sp = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    with plait.Engine(path, speculative_algorithm="NGRAM") as engine:
        assert engine.scheduler.verify_as_decode  # the CPU verifies decode-shaped
        spec = engine.scheduler.spec
        assert spec is not None
        drafted = engine.generate(input_ids=ids, sampling_params=sp)
        assert engine.get_server_info()["spec_verify_passes"] > 0
        spec.cost = PassCost()  # forget this machine's times: seconds per token only
        for n in (1, 64, 128):
            spec.cost.observe(n, 1.0 * n)
        before = engine.get_server_info()["spec_verify_passes"]
        plain = engine.generate(input_ids=[9, *ids], sampling_params=sp)
        assert engine.get_server_info()["spec_verify_passes"] == before
    with plait.Engine(path) as engine:
        assert (
            engine.generate(input_ids=[9, *ids], sampling_params=sp)["output_ids"]
            == (plain["output_ids"])
        )
        assert (
            engine.generate(input_ids=ids, sampling_params=sp)["output_ids"]
            == (drafted["output_ids"])
        )


def test_a_capped_request_probes_with_one_draft_now_and_then():
    s = DraftState(budget=7)
    got = [probe(0, s) for _ in range(2 * PROBE_EVERY)]
    assert got.count(1) == 2 and got[PROBE_EVERY - 1] == 1 and sum(got) == 2
    assert probe(3, s) == 3 and s.capped == 0
