"""Prometheus metrics for ``GET /metrics``.

Latencies are measured where the client sees them (the HTTP process, as outputs arrive);
queue/running/KV gauges and the per-phase step time are read from the engine's server info at
scrape time. Each app has
its own registry so several servers (tests) can live in one interpreter.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class _Track:
    start: float
    last: float | None = None
    tokens: int = 0
    stream: bool = False


class CountedHistogram:
    """A Prometheus histogram kept in plain ints and rendered at scrape time: ``add(value,
    n)`` records ``n`` observations of ``value`` with one bisect and two additions (the
    inter-token latency is observed once per token of every stream and step, and
    ``Histogram.observe`` takes a lock and walks every bucket per observation). Only the
    HTTP process's event loop adds; a scrape (the same loop) reads."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]):
        self.name, self.documentation = name, documentation
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def add(self, value: float, n: int = 1) -> None:
        # a value equal to a bound belongs to that bucket (le): bisect_left
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def collect(self) -> list[HistogramMetricFamily]:
        cumulative, total = [], 0
        for bound, count in zip([*self.bounds, float("inf")], self.counts):
            total += count
            cumulative.append((_le(bound), total))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], cumulative, self.sum)
        return [family]


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


@dataclass
class ServerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    _tracks: dict[str, _Track] = field(default_factory=dict)
    _recent: deque = field(default_factory=deque)  # (time, new tokens) for throughput
    _last_steps: dict = field(default_factory=dict)  # engine totals at the previous scrape
    _step_tokens: int = 0  # tokens counted by on_tokens since the last end_step

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "plait_requests", "Finished generation requests", ["finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("plait_prompt_tokens", "Prompt tokens", registry=r)
        self.cached_tokens = Counter(
            "plait_cached_tokens", "Prompt tokens served from the prefix cache", registry=r
        )
        # Read from the engine's counter at scrape time: under disaggregation the decode server
        # must show 0 here (its prompts' KV came from a prefill server).
        self.computed_prompt_tokens = Counter(
            "plait_computed_prompt_tokens",
            "Prompt tokens this server ran through the model itself (not cached, not received)",
            registry=r,
        )
        self.generation_tokens = Counter("plait_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "plait_time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = CountedHistogram(
            "plait_inter_token_latency_seconds", "Time between tokens", _LATENCY_BUCKETS
        )
        r.register(self.itl)  # type: ignore[arg-type]  # a collector: has collect()
        self.e2e = Histogram(
            "plait_e2e_request_latency_seconds",
            "Request latency",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Gauge("plait_num_queue_reqs", "Requests waiting to be scheduled", registry=r)
        self.running = Gauge("plait_num_running_reqs", "Requests in the running batch", registry=r)
        self.inflight = Gauge(
            "plait_num_inflight_reqs", "Requests the HTTP server awaits", registry=r
        )
        self.token_usage = Gauge("plait_token_usage", "Fraction of KV slots in use", registry=r)
        self.cache_hit_rate = Gauge(
            "plait_cache_hit_rate", "Cached prompt tokens / prompt tokens", registry=r
        )
        self.throughput = Gauge(
            "plait_gen_throughput", "Generated tokens per second over the last 10 s", registry=r
        )
        self.step_seconds = Counter(
            "plait_step_seconds",
            "Scheduler step time by phase: schedule, process (scheduler "
            "thread), forward, sample (executor) and wait (scheduler blocked on the executor); "
            "with the overlap schedule forward and sample run alongside the others",
            ["phase"],
            registry=r,
        )
        self.forward_passes = Counter("plait_forward_passes", "Forward passes (steps)", registry=r)
        self.refused = Counter(
            "plait_requests_refused",
            "Requests refused at admission: 429 (count limit) or 503 (queue-time bound)",
            ["status"],
            registry=r,
        )
        self.spec_verify_passes = Counter(
            "plait_spec_verify_passes", "Speculative verify passes (forwards)", registry=r
        )
        self.spec_draft_tokens = Counter(
            "plait_spec_draft_tokens", "Speculative draft tokens verified", registry=r
        )
        self.spec_accepted_tokens = Counter(
            "plait_spec_accepted_tokens", "Speculative draft tokens accepted", registry=r
        )
        self.spec_accept_length = Gauge(
            "plait_spec_accept_length",
            "Tokens committed per request and verify pass since start (accepted drafts + 1)",
            registry=r,
        )

    def on_tokens(self, rid: str, tokens: int, now: float) -> None:
        """``rid`` has produced ``tokens`` so far (a running request's step, from
        ``route_batch``): its TTFT or ITL observations, in plain ints; the generated tokens'
        counter and the throughput window advance once per step, in :meth:`end_step`."""
        track = self._tracks.get(rid)
        if track is None or tokens <= track.tokens:
            return
        new = tokens - track.tokens
        if track.last is None:
            self.ttft.observe(now - track.start)
        else:
            self.itl.add((now - track.last) / new, new)
        self._step_tokens += new
        track.tokens, track.last = tokens, now

    def end_step(self, now: float) -> None:
        """Publish the tokens :meth:`on_tokens` counted since the last call."""
        if self._step_tokens:
            self._recent.append((now, self._step_tokens))
            self.generation_tokens.inc(self._step_tokens)
            self._step_tokens = 0

    # Called by EngineClient for every full output (finished or not).
    def on_output(self, rid: str, out: dict[str, Any], finished: bool, now: float) -> None:
        track = self._tracks.get(rid)
        if track is None:
            return
        meta = out.get("meta_info") or {}
        self.on_tokens(rid, int(meta.get("completion_tokens") or 0), now)
        self.end_step(now)
        if finished:
            self._tracks.pop(rid, None)
            self.e2e.observe(now - track.start)
            fr = meta.get("finish_reason")
            self.requests.labels(
                fr.get("type", "unknown") if isinstance(fr, dict) else str(fr)
            ).inc()
            self.prompt_tokens.inc(int(meta.get("prompt_tokens") or 0))
            self.cached_tokens.inc(int(meta.get("cached_tokens") or 0))

    def start(self, rid: str) -> None:
        self._tracks[rid] = _Track(start=time.monotonic())

    def finish(self, rid: str, reason: str) -> None:
        """A request that ended without a finished output (client gone, timeout, error):
        counted under ``finish_reason=reason``; a no-op if its finish was already counted."""
        track = self._tracks.pop(rid, None)
        if track is not None:
            self.e2e.observe(time.monotonic() - track.start)
            self.requests.labels(reason).inc()

    def render(self, server_info: dict[str, Any] | None, inflight: int) -> tuple[bytes, str]:
        info = server_info or {}
        self.inflight.set(inflight)
        self.queue.set(_first(info, "num_queue_reqs", "num_waiting_reqs", default=0))
        self.running.set(_first(info, "num_running_reqs", default=inflight))
        usage = _first(info, "token_usage", default=None)
        total = _first(info, "max_total_tokens", "max_total_num_tokens", default=None)
        free = _first(info, "available_kv_tokens", default=None)
        if usage is None and total and free is not None:
            # Cached-but-unreferenced prefixes are reclaimable, so they count as free.
            usage = 1 - (free + _first(info, "evictable_kv_tokens", default=0)) / total
        self.token_usage.set(usage or 0.0)
        computed = _first(info, "prefill_tokens", default=None)
        if computed is not None and computed > _counter_value(self.computed_prompt_tokens):
            self.computed_prompt_tokens.inc(computed - _counter_value(self.computed_prompt_tokens))
        prompt = _counter_value(self.prompt_tokens)
        self.cache_hit_rate.set(_counter_value(self.cached_tokens) / prompt if prompt else 0.0)
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - 10:
            self._recent.popleft()
        self.throughput.set(sum(n for _, n in self._recent) / 10.0)
        self._count_steps(info)
        self.spec_accept_length.set(_first(info, "spec_accept_length", default=0.0))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _count_steps(self, info: dict[str, Any]) -> None:
        """Advance the step counters by what the engine's totals grew since the last scrape
        (a restarted engine's smaller totals start the count afresh)."""
        for key, counter in [(f"{p}_seconds", self.step_seconds.labels(p)) for p in _PHASES] + [
            ("forward_passes", self.forward_passes),
            ("spec_verify_passes", self.spec_verify_passes),
            ("spec_draft_tokens", self.spec_draft_tokens),
            ("spec_accepted_tokens", self.spec_accepted_tokens),
        ]:
            value = _first(info, key, default=None)
            if value is None:
                continue
            last = self._last_steps.get(key, 0)
            counter.inc(value - last if value >= last else value)
            self._last_steps[key] = value


_PHASES = ("schedule", "forward", "sample", "process", "wait")


def _first(info: dict[str, Any], *keys: str, default: Any) -> Any:
    for k in keys:
        if isinstance(info.get(k), (int, float)):
            return info[k]
    return default


def _counter_value(counter: Counter) -> float:
    return counter._value.get()
