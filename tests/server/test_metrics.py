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
