"""Speculation's cost model (``plait.core.spec.cost``): drafts only where they pay at the batch
size, from pass times measured online; the verify pass's shape on the CPU."""

from __future__ import annotations

import pytest

import plait
from plait.core.spec.cost import PROBE_EVERY, PassCost, choose_drafts, probe
from plait.core.spec.ngram import DraftState


def _cost(plain: dict[int, float], verify: dict[int, float]) -> PassCost:
    cost = PassCost()
    for table, is_verify in ((plain, False), (verify, True)):
        for n, s in table.items():
            for _ in range(3):
                cost.observe(n, s, verify=is_verify)
    return cost


def test_pass_cost_reads_plain_medians_and_a_verify_line():
    cost = PassCost()
    cost.observe(16, 0.4)
    assert cost.fit(16) is None and cost.plain(16) == pytest.approx(0.4)  # no verify pass
    cost.observe(128, 1.6, verify=True)
    fixed, per_row = cost.fit(16)  # type: ignore[misc]
    assert per_row == pytest.approx(1.2 / 112)  # one verify size: through the plain pass
    assert fixed == pytest.approx(0.4 - 16 * 1.2 / 112)
    assert cost.line(72, 16) == pytest.approx(1.0)
    # a size's estimate is the median of its recent times: one descheduled pass moves nothing,
    # and a size timed every step is not biased low against one timed once
    for s in (0.4, 0.4, 3.0, 0.4, 0.4):
        cost.observe(16, s)
    assert cost.plain(16) == pytest.approx(0.4)
    assert cost.plain(17) is None  # a verify size is no plain decode's
    # times that fall with size mean nothing costs per row: every draft pays
    flat = _cost({1: 0.5}, {8: 0.45, 64: 0.4})
    assert flat.fit(1) == (pytest.approx(0.45), 0.0)
    assert choose_drafts(flat, [0.1], [7]) == [7]


# this machine's batch-16 shape (SmolLM2-135M, one thread, CPU time): a 16-row decode pass,
# the 17th row's remainder tile, then ~2.2 ms a row
PLAIN16 = {16: 0.080}
CONCAVE = {17: 0.105, 24: 0.123, 32: 0.161, 64: 0.230, 128: 0.375}


def test_drafts_are_chosen_for_the_batch_by_expected_tokens_a_second():
    assert choose_drafts(PassCost(), [0.1] * 16, [7] * 16) == [7] * 16  # untimed: no cap
    bound = _cost({1: 0.040}, {8: 0.042})  # batch 1 reads the weights: drafts nearly free
    assert choose_drafts(bound, [0.8], [7]) == [7]
    assert choose_drafts(bound, [0.5], [7])[0] >= 5  # ~2 tokens for 1.05x the time
    assert choose_drafts(bound, [0.8], [3]) == [3]  # never past the proposer's budget
    compute = _cost({16: 0.16}, {128: 1.28})  # a row costs a decoded token: never
    assert choose_drafts(compute, [0.95] * 16, [7] * 16) == [0] * 16
    concave = _cost(PLAIN16, CONCAVE)
    # everyone copies: long drafts for all, the 128-row pass (tokens/s 3x plain decode's)
    assert choose_drafts(concave, [0.99] * 16, [7] * 16) == [7] * 16
    # a mixed batch: drafts go to the requests that copy, none to those that do not
    caps = choose_drafts(concave, [0.95] * 8 + [0.3] * 8, [7] * 16)
    assert caps[8:] == [0] * 8 and min(caps[:8]) >= 5
    # acceptance too low for what a row costs at batch 16: plain decoding
    assert choose_drafts(concave, [0.5] * 16, [7] * 16) == [0] * 16
    assert sum(choose_drafts(concave, [0.9] * 16, [7] * 16)) >= 64


def _ratio(accept: float, drafts: int) -> float:
    """Expected tokens a second of a batch-16 pass with the ``drafts`` best drafts (every
    request accepting with ``accept``) over plain decoding's, on the CONCAVE profile (linear
    between its sizes): the truth the rule estimates."""
    gains = sorted([accept**j for j in range(1, 8)] * 16, reverse=True)
    sizes = sorted({**PLAIN16, **CONCAVE}.items())
    rows = 16 + drafts
    (n1, s1), (n2, s2) = next((a, b) for a, b in zip(sizes, sizes[1:]) if rows <= b[0])
    seconds = s1 + (s2 - s1) * (rows - n1) / (n2 - n1)
    return (16 + sum(gains[:drafts])) / seconds / (16 / PLAIN16[16])


@pytest.mark.parametrize(
    "plain, verify",
    [
        # batch 1 served before (weight-bound: a verify pass of a few rows nearly free)
        ({1: 0.025, 16: 0.080}, {2: 0.026, 5: 0.040, 8: 0.053, **CONCAVE}),
        # the batch shrank as requests finished: plain passes of 1-12 rows, nearly flat
        ({1: 0.025, 4: 0.030, 8: 0.045, 12: 0.062, 16: 0.080}, CONCAVE),
        # only the first (uncapped) and a one-draft verify pass timed yet
        (PLAIN16, {17: 0.105, 128: 0.375}),
    ],
)
def test_batch_16_drafts_that_pay_are_kept_whatever_else_was_timed(plain, verify):
    """The verify cost comes from the verify sizes a batch-16 pass can have: times of other
    batches and of plain decode passes tilted a line through them all, which then cut
    half of the drafts that pay (32 of the 80 that pay at acceptance 0.9)."""
    for accept in (0.85, 0.9, 0.95):
        best = max(_ratio(accept, m) for m in range(113))
        chosen = sum(choose_drafts(_cost(plain, verify), [accept] * 16, [7] * 16))
        assert _ratio(accept, chosen) >= best - 0.02, (accept, chosen)


def test_two_close_verify_sizes_and_one_slow_pass_do_not_stop_drafting():
    """Seen in a batch-16 run (one thread, CPU time): the first two verify passes, 112 and
    128 rows, the first of them slow; a line through those two alone said 8.5 ms a row and
    cut every draft, so no other size got timed. The plain pass anchors the line."""
    cost = _cost(PLAIN16, {112: 0.375, 128: 0.511})
    assert sum(choose_drafts(cost, [0.92] * 16, [7] * 16)) >= 16  # drafts go on: sizes timed


def test_a_batch_with_no_verify_pass_timed_in_its_range_is_not_capped():
    """Only batch-1 verify passes timed: nothing says what a batch-16 one costs, so the
    proposer's drafts go through and that pass is timed; batch 1 is capped by its own."""
    cost = _cost({1: 0.025, 16: 0.080}, {2: 0.5, 8: 4.0})  # batch 1: drafts never pay
    assert choose_drafts(cost, [0.3] * 16, [7] * 16) == [7] * 16
    assert choose_drafts(cost, [0.9], [7]) == [0]


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
        spec.cost.observe(1, 1.0)
        for n in (2, 4, 8):  # the verify sizes of a batch of one
            spec.cost.observe(n, 1.0 * n, verify=True)
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
