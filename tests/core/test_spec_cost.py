"""Speculation's cost model (``plait.core.spec.cost``): drafts only where they pay at the batch
size, from pass times measured online; the verify pass's shape on the CPU."""

from __future__ import annotations

import pytest

import plait
from plait.core.spec.cost import PROBE_EVERY, PassCost, choose_drafts, probe
from plait.core.spec.ngram import DraftState


def _cost(points: dict[int, float]) -> PassCost:
    cost = PassCost()
    for n, s in points.items():
        for _ in range(3):
            cost.observe(n, s)
    return cost


def test_pass_cost_reads_each_size_median_between_sizes_and_the_line_beyond():
    cost = PassCost()
    cost.observe(16, 0.4)
    assert cost.fit() is None and cost.at(16) is None  # one size: nothing to go on
    cost.observe(128, 1.6)
    fixed, per_row = cost.fit()  # type: ignore[misc]
    assert per_row == pytest.approx(1.2 / 112)
    assert fixed == pytest.approx(0.4 - 16 * 1.2 / 112)
    assert cost.at(72) == pytest.approx(1.0) == cost.line(72)  # untimed: the line
    # a size's estimate is the median of its recent times: one descheduled pass moves nothing,
    # and a size timed every step is not biased low against one timed once
    for s in (0.4, 0.4, 3.0, 0.4, 0.4):
        cost.observe(16, s)
    assert cost.at(16) == pytest.approx(0.4)
    cost.observe(17, 0.6)  # a timed size reads its own time
    assert cost.at(17) == pytest.approx(0.6) and cost.at(16) == pytest.approx(0.4)
    # times that fall with size mean nothing costs per row: every draft pays
    flat = _cost({1: 0.5, 64: 0.4})
    assert flat.fit() == (pytest.approx(0.45), 0.0)
    assert choose_drafts(flat, [0.1], [7]) == [7]


# this machine's batch-16 shape (SmolLM2-135M, one thread, CPU time): a 16-row decode pass,
# the 17th row's remainder tile, then ~2.2 ms a row
CONCAVE = {16: 0.080, 17: 0.105, 32: 0.161, 64: 0.230, 128: 0.375}


def test_drafts_are_chosen_for_the_batch_by_expected_tokens_a_second():
    assert choose_drafts(PassCost(), [0.1] * 16, [7] * 16) == [7] * 16  # untimed: no cap
    bound = _cost({1: 0.040, 8: 0.042})  # batch 1 reads the weights: drafts nearly free
    assert choose_drafts(bound, [0.8], [7]) == [7]
    assert choose_drafts(bound, [0.5], [7])[0] >= 5  # ~2 tokens for 1.05x the time
    assert choose_drafts(bound, [0.8], [3]) == [3]  # never past the proposer's budget
    compute = _cost({1: 0.01, 16: 0.16, 128: 1.28})  # a row costs a decoded token: never
    assert choose_drafts(compute, [0.95] * 16, [7] * 16) == [0] * 16
    concave = _cost(CONCAVE)
    # everyone copies: long drafts for all, the 128-row pass (tokens/s 3x plain decode's)
    assert choose_drafts(concave, [0.99] * 16, [7] * 16) == [7] * 16
    # a mixed batch: drafts go to the requests that copy, none to those that do not
    caps = choose_drafts(concave, [0.95] * 8 + [0.3] * 8, [7] * 16)
    assert caps[8:] == [0] * 8 and min(caps[:8]) >= 5
    # acceptance too low for what a row costs at batch 16: plain decoding
    assert choose_drafts(concave, [0.5] * 16, [7] * 16) == [0] * 16
    assert sum(choose_drafts(concave, [0.9] * 16, [7] * 16)) >= 64


def test_an_unverified_draft_still_measures_acceptance():
    """A request the cost model keeps from drafting is checked against what decoding
    commits, so its estimate recovers when its text turns copyable (and falls when not)."""
    s = DraftState(budget=7)
    for _ in range(6):
        s.record(3, 0, max_drafts=7)
    low = s.acceptance()
    seq = [1, 2, 3]
    for t in range(4, 10):
        s.remember([t], len(seq))
        s.check_shadow(seq)  # not decoded past it yet: nothing counted
        assert s.shadow == t
        seq.append(t)  # decoding commits the token the draft proposed
        s.check_shadow(seq)
        assert s.shadow is None
    assert s.acceptance() > low + 0.3
    high = s.acceptance()
    s.remember([99], len(seq))
    s.check_shadow([*seq, 5])
    assert s.acceptance() < high
    s.remember([], len(seq))  # nothing proposed: nothing to count
    s.check_shadow([*seq, 5, 6])
    assert s.acceptance() < high and s.shadow is None


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


def test_a_capped_standalone_request_probes_with_one_draft_now_and_then():
    s = DraftState(budget=7)
    got = [probe(0, s) for _ in range(2 * PROBE_EVERY)]
    assert got.count(1) == 2 and got[PROBE_EVERY - 1] == 1 and sum(got) == 2
    assert probe(3, s) == 3 and s.capped == 0
