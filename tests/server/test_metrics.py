"""``/metrics`` step-phase counters follow the engine's totals from scrape to scrape."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from plait.server.metrics import ServerMetrics


def samples(data: bytes) -> dict[tuple, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(data.decode())
        for s in fam.samples
    }


def step_info(schedule: float, forward: float, passes: int) -> dict:
    return {
        "schedule_seconds": schedule,
        "forward_seconds": forward,
        "process_seconds": 0.5,
        "wait_seconds": 0.25,
        "forward_passes": passes,
    }


def test_step_phase_counters_track_engine_totals():
    m = ServerMetrics()
    m.render(step_info(1.0, 4.0, 10), 0)
    got = samples(m.render(step_info(1.5, 6.0, 14), 0)[0])
    assert got[("plait_step_seconds_total", (("phase", "schedule"),))] == 1.5
    assert got[("plait_step_seconds_total", (("phase", "forward"),))] == 6.0
    assert got[("plait_step_seconds_total", (("phase", "wait"),))] == 0.25
    assert got[("plait_forward_passes_total", ())] == 14


def test_a_restarted_engine_keeps_the_counters_monotonic():
    m = ServerMetrics()
    m.render(step_info(5.0, 9.0, 50), 0)
    got = samples(m.render(step_info(0.5, 1.0, 3), 0)[0])
    assert got[("plait_step_seconds_total", (("phase", "forward"),))] == 10.0
    assert got[("plait_forward_passes_total", ())] == 53


def test_info_without_step_totals_exports_zero():
    got = samples(ServerMetrics().render({}, 0)[0])
    assert got[("plait_forward_passes_total", ())] == 0


def test_a_step_of_streams_counts_ttft_itl_and_tokens_in_plain_ints():
    """route_batch's per-stream calls (on_tokens) then one end_step: the histograms, the
    generated tokens and their Prometheus text as observing each token would give."""
    m = ServerMetrics()
    m.start("a")
    m.start("b")
    m._tracks["a"].start = m._tracks["b"].start = 100.0
    m.on_tokens("a", 1, 100.2)  # first token: TTFT 0.2
    m.on_tokens("b", 1, 100.2)
    m.end_step(100.2)
    m.on_tokens("a", 3, 100.22)  # two tokens in 0.02 s: two ITL observations of 0.01
    m.on_tokens("b", 1, 100.22)  # nothing new: nothing observed
    m.end_step(100.22)
    m.on_tokens("a", 4, 100.32)  # 0.1 s: counted in the le=0.1 bucket (le is inclusive)
    m.end_step(100.32)
    assert list(m._recent) == [(100.2, 2), (100.22, 2), (100.32, 1)]  # one entry per step
    got = samples(m.render({}, 0)[0])
    itl = "plait_inter_token_latency_seconds"
    assert got[(f"{itl}_count", ())] == 3
    assert abs(got[(f"{itl}_sum", ())] - 0.12) < 1e-9
    assert got[(f"{itl}_bucket", (("le", "0.005"),))] == 0
    assert got[(f"{itl}_bucket", (("le", "0.01"),))] == 2
    assert got[(f"{itl}_bucket", (("le", "0.05"),))] == 2
    assert got[(f"{itl}_bucket", (("le", "0.1"),))] == 3
    assert got[(f"{itl}_bucket", (("le", "+Inf"),))] == 3
    assert got[("plait_time_to_first_token_seconds_count", ())] == 2
    assert got[("plait_generation_tokens_total", ())] == 5
