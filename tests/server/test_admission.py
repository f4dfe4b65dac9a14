"""Admission bounded by queue time (issue 42 item 2): the unit rules on a fake clock, then a
real server (fake engine) shedding with 503 + Retry-After once its drain rate is measured,
while the requests it accepts complete."""

from __future__ import annotations

import threading

import pytest
import requests

from plait.server.admission import MIN_SAMPLES, RATE_SECONDS, AdmissionControl
from tests.server.conftest import FAKE, start_server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _control(
    clock: Clock, max_queue_time: float | None = 2.0, running_slots: int = 4
) -> AdmissionControl:
    return AdmissionControl(
        running_slots=running_slots, max_queued=100, max_queue_time=max_queue_time, clock=clock
    )


def _finish_at_rate(ctl: AdmissionControl, clock: Clock, rate: float, n: int) -> None:
    for _ in range(n):
        ctl.enter(1)
        clock.now += 1 / rate
        ctl.leave(1)


def test_a_cold_server_applies_only_the_count_limit():
    clock = Clock()
    ctl = _control(clock)
    ctl.enter(100)  # a long queue, but nothing has finished yet: no rate to predict from
    assert ctl.refusal(1) is None
    ctl.enter(4)
    refusal = ctl.refusal(1)
    assert refusal is not None and refusal.status == 429 and refusal.retry_after == 1


def test_a_predicted_wait_over_the_bound_is_shed_with_503_and_retry_after():
    clock = Clock()
    ctl = _control(clock)
    _finish_at_rate(ctl, clock, rate=10.0, n=MIN_SAMPLES + 2)
    assert abs(ctl.drain_rate() - 10.0) < 0.5
    ctl.enter(4 + 15)  # 4 running, 15 queued: a new one waits ~1.6 s < 2 s
    assert ctl.refusal(1) is None
    ctl.enter(35)  # 50 queued: ~5.1 s
    refusal = ctl.refusal(1)
    assert refusal is not None and refusal.status == 503
    assert refusal.retry_after == 4  # ceil(5.1 - 2)
    assert "--max-queue-time" in refusal.message


def test_finishes_older_than_the_window_do_not_count():
    clock = Clock()
    ctl = _control(clock)
    _finish_at_rate(ctl, clock, rate=10.0, n=MIN_SAMPLES + 2)
    clock.now += RATE_SECONDS + 1  # an idle spell: the old rate says nothing about now
    ctl.enter(90)
    assert ctl.drain_rate() is None
    assert ctl.refusal(1) is None


def test_the_bound_off_keeps_the_count_limit_only():
    clock = Clock()
    ctl = _control(clock, max_queue_time=None)
    _finish_at_rate(ctl, clock, rate=10.0, n=MIN_SAMPLES + 2)
    ctl.enter(90)
    assert ctl.refusal(1) is None


def test_time_already_spent_since_arrival_counts_against_the_bound():
    """A request parsed and tokenized slowly (an overloaded HTTP process) has spent part of its
    bound before it asks to queue: that time plus the predicted wait is what is bounded."""
    clock = Clock()
    ctl = _control(clock)
    _finish_at_rate(ctl, clock, rate=10.0, n=MIN_SAMPLES + 2)
    ctl.enter(4 + 15)  # a new one would queue ~1.6 s: within the 2 s bound when fresh
    assert ctl.refusal(1, waited=0.0) is None
    refusal = ctl.refusal(1, waited=1.0)  # 1 s since arrival + 1.6 s queued > 2 s
    assert refusal is not None and refusal.status == 503
    # Retry-After is about the queue, not this request's past: the queue is under the bound
    assert refusal.retry_after == 1


def test_a_request_that_runs_at_once_is_not_shed_for_its_time_since_arrival():
    """With a running place free it starts at once; shedding it would idle that place."""
    clock = Clock()
    ctl = _control(clock)
    _finish_at_rate(ctl, clock, rate=10.0, n=MIN_SAMPLES + 2)
    ctl.enter(3)
    assert ctl.refusal(1, waited=10.0) is None


def test_the_oldest_wait_counts_from_the_arrival_it_was_posted_with():
    clock = Clock()
    ctl = _control(clock)
    _finish_at_rate(ctl, clock, rate=100.0, n=MIN_SAMPLES + 2)
    ctl.enter(4)
    ctl.posted("a", since=clock.now - 2.5)  # arrived 2.5 s ago, posted just now
    assert ctl.oldest_wait() == pytest.approx(2.5)
    refusal = ctl.refusal(1)
    assert refusal is not None and refusal.status == 503


@pytest.mark.slow
def test_a_sequence_waiting_past_the_bound_sheds_what_would_queue_without_a_rate():
    """The rate lags a falling service rate; the oldest wait does not: while a posted sequence
    has had no first output for longer than the bound, a request that would queue is shed,
    one that would run at once is not, and the shedding ends when that sequence starts."""
    clock = Clock()
    ctl = _control(clock)
    _finish_at_rate(ctl, clock, rate=100.0, n=MIN_SAMPLES + 2)  # a fast rate: no predicted wait
    ctl.enter(4)
    for rid in ("a", "b", "c", "d"):
        ctl.posted(rid)
    clock.now += 3.0  # past the 2 s bound, none has started
    assert ctl.oldest_wait() == pytest.approx(3.0)
    refusal = ctl.refusal(1)
    assert refusal is not None and refusal.status == 503 and refusal.retry_after >= 1
    ctl.started("a")
    assert ctl.refusal(1) is not None  # "b" has waited as long
    ctl.leave(1)
    assert ctl.refusal(1) is None  # a place is free: it would run at once, not queue
    ctl.enter(1)
    for rid in ("b", "c", "d"):
        ctl.started(rid)
    assert ctl.oldest_wait() == 0.0
    assert ctl.refusal(1) is None


def test_an_overloaded_server_sheds_with_503_and_serves_what_it_accepts(tiny_model_dir, tmp_path):
    # 8 running places, each request ~1 s (50 tokens x 0.02 s): ~8 finishes a second. 48
    # clients in a loop ask for ~6 s of queue; the bound is 1 s.
    server = start_server(
        [*FAKE, "--max-running-requests", "8", "--max-queue-time", "1"],
        tmp_path / "overload.log",
        str(tiny_model_dir),
        env={"FAKE_ENGINE_TOKEN_DELAY": "0.02"},
        timeout=120,
    )
    statuses: list[int] = []
    retry_after: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(6):
            r = requests.post(
                server.url + "/generate",
                json={"text": "load", "sampling_params": {"max_new_tokens": 50}},
                timeout=120,
            )
            with lock:
                statuses.append(r.status_code)
                if r.status_code == 503:
                    retry_after.append(r.headers.get("Retry-After", ""))
            if r.status_code == 200:
                assert r.json()["meta_info"]["completion_tokens"] == 50

    try:
        threads = [threading.Thread(target=client) for _ in range(48)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) > 0 and statuses.count(200) >= 8
        assert all(v.isdigit() and int(v) >= 1 for v in retry_after)
        metrics = requests.get(server.url + "/metrics", timeout=10).text
        assert 'plait_requests_refused_total{status="503"}' in metrics
    finally:
        server.stop()
