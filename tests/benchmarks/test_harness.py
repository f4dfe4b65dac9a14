"""benchmarks/harness.py: seeded workloads, the rates' definitions (timed with a fake clock),
the ABBA order and the ratio table. No engine started."""

from __future__ import annotations

import pytest

from benchmarks import harness


def test_workloads_are_a_function_of_the_seed():
    a, b = harness.make_workloads(seed=3), harness.make_workloads(seed=3)
    assert [w.requests for w in a] == [w.requests for w in b]
    assert [w.requests for w in a] != [w.requests for w in harness.make_workloads(seed=4)]


def test_workloads_match_the_issue():
    w = {x.name: x for x in harness.make_workloads()}
    assert list(w) == ["batch1", "batch16", "batch64", "mixed", "shared_prefix"]
    for b in (1, 16, 64):
        assert [(len(p), n) for p, n in w[f"batch{b}"].requests] == [(32, 64)] * b
    mixed = w["mixed"].requests
    assert len(mixed) == 64 and all(32 <= len(p) <= 256 and 16 <= n <= 96 for p, n in mixed)
    assert len({len(p) for p, _ in mixed}) > 10  # mixed, not one length
    shared = w["shared_prefix"].requests
    assert len(shared) == 32 and len({tuple(p[:1000]) for p, _ in shared}) == 1
    assert len({tuple(p[1000:]) for p, _ in shared}) == 32
    assert all(100 <= t < 40000 for x in w.values() for p, _ in x.requests for t in p)


def test_batches_prompt_and_new_tokens_can_be_chosen():
    w = harness.make_workloads(new=16, batches=(2, 256), prompt_len=8)
    assert [x.name for x in w] == ["batch2", "batch256", "mixed", "shared_prefix"]
    assert [(len(p), n) for p, n in w[1].requests] == [(8, 16)] * 256


def test_rates_are_generated_tokens_or_requests_per_second():
    reqs = [([1], 10), ([2], 30)]
    assert harness.Workload(name="t", title="t", unit="tok/s", requests=reqs).rate(2.0) == 20.0
    assert harness.Workload(name="r", title="r", unit="req/s", requests=reqs).rate(0.5) == 4.0


class _ClockEngine:
    """Advances a fake clock: ``prefill`` s per call, then ``step`` s per decode step (the
    batch's longest request), so every rate has an exact expected value."""

    def __init__(self, clock: list[float], prefill: float, step: float):
        self.clock, self.prefill, self.step = clock, prefill, step
        self.calls: list[tuple[str, list[int]]] = []

    def flush_cache(self):
        self.calls.append(("flush", []))

    def generate(self, *, input_ids, sampling_params):
        assert len(input_ids) == len(sampling_params)
        assert all(sp["temperature"] == 0 and sp["ignore_eos"] for sp in sampling_params)
        news = [sp["max_new_tokens"] for sp in sampling_params]
        self.calls.append(("generate", news))
        self.clock[0] += self.prefill + self.step * (max(news) - 1)


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: now[0])
    return now


def test_serve_seconds_times_one_call_from_an_empty_cache(clock):
    engine = _ClockEngine(clock, prefill=0.5, step=0.25)
    assert harness.serve_seconds(engine, [([1, 2], 5), ([3], 3)]) == pytest.approx(1.5)
    assert engine.calls == [("flush", []), ("generate", [5, 3])]


def test_decode_rate_subtracts_prefill_and_the_first_token(clock):
    engine = _ClockEngine(clock, prefill=3.0, step=0.25)
    w = harness.Workload(name="b4", title="", unit="tok/s", requests=[([7] * 8, 9)] * 4)
    # 4 requests x 8 decode tokens over 8 steps of 0.25 s; the 3 s prefill drops out
    assert harness.decode_rate(engine, w) == pytest.approx(32 / 2.0)
    assert [c for c in engine.calls if c[0] == "generate"] == [
        ("generate", [1] * 4),
        ("generate", [9] * 4),
    ]


def test_alternate_runs_every_config_once_per_round_in_abba_order():
    order = list(harness.alternate(["a", "b", "c"], 3))
    assert [c for _, c in order] == list("abccbaabc")
    assert [r for r, _ in order] == [0] * 3 + [1] * 3 + [2] * 3
    with pytest.raises(ValueError, match="rounds"):
        list(harness.alternate(["a"], 0))


def test_medians_of_numbers_and_the_first_error():
    runs = [{"x": 3.0, "err": ""}, {"x": 1.0, "err": "boom"}, {"x": 2.0, "err": "late"}]
    assert harness.medians(runs) == {"x": 2.0, "err": "boom"}


def test_table_shows_each_config_then_its_ratio_to_the_baseline():
    text = harness.table(
        [("row a", {"old": 10.0, "new": 25.0, "x": 5.0}), ("row b", {"old": 4.0, "x": 2.0})],
        baseline="old",
    )
    assert text.splitlines() == [
        "| workload | old | new | x | new / old | x / old |",
        "|---|---:|---:|---:|---:|---:|",
        "| row a | 10.0 | 25.0 | 5.0 | 2.50x | 0.50x |",
        "| row b | 4.0 | — | 2.0 | — | 0.50x |",
    ]
    with pytest.raises(ValueError, match="baseline"):
        harness.table([("r", {"a": 1.0})], baseline="b")


def test_phase_split_is_milliseconds_per_pass_between_two_readings():
    def totals(passes, tokens, **seconds):
        return harness.step_totals(
            {
                **{f"{p}_seconds": s for p, s in seconds.items()},
                "forward_passes": passes,
                "generated_tokens": tokens,
            }
        )

    split = harness.phase_split(
        totals(10, 100, schedule=1.0, forward=2.0),
        totals(30, 500, schedule=1.2, forward=2.8, sample=0.1),
    )
    assert split["passes"] == 20 and split["tokens_per_pass"] == pytest.approx(20.0)
    assert split["schedule_ms"] == pytest.approx(10.0)
    assert split["forward_ms"] == pytest.approx(40.0)
    assert split["sample_ms"] == pytest.approx(5.0) and split["wait_ms"] == 0.0


class _StreamEngine:
    """Streams cumulative outputs on a fake clock: request ``a`` one token per 10 ms, ``b``
    two tokens at once every 40 ms (20 ms a token)."""

    def __init__(self, clock: list[float]):
        self.clock = clock

    def flush_cache(self):
        pass

    def generate(self, *, input_ids, sampling_params, stream):
        assert stream
        for t, rid, n in [(0, "a", 1), (0, "b", 2), (10, "a", 2), (20, "a", 3), (40, "b", 4)]:
            self.clock[0] = t / 1000
            yield {"meta_info": {"id": rid}, "output_ids": list(range(n))}


def test_itl_splits_each_gap_over_the_tokens_it_brought(clock):
    p50, p99 = harness.itl_ms(_StreamEngine(clock), [([1], 3), ([2], 4)])
    # gaps per token: a 10, 10; b 20, 20 (the first output of each is TTFT, not counted)
    assert p50 == pytest.approx(15.0) and p99 == pytest.approx(20.0)
