"""Soak: mixed traffic against one real ``plait serve`` (SmolLM2-135M on CPU) at bounded
concurrency. Must hold: zero 5xx, zero lost responses, RSS growth under ``RSS_BOUND_MIB``, KV
usage back to zero at the end.

    PLAIT_SOAK_SECONDS=300 python -m pytest -m soak tests/server/test_soak.py -s   # full soak

The default duration is 30 s so a CI run stays short (over 100 requests even on a loaded
machine, every kind many times over); docs/reliability.md records a run.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from tests.server.bad_inputs import CASES, send_bad
from tests.server.conftest import start_server
from tests.server.test_server_fake import sse_events, wait_until_idle

pytestmark = [pytest.mark.slow, pytest.mark.soak]

MODEL = "SmolLM2-135M-Instruct"
CONCURRENCY = 6
RSS_BOUND_MIB = 150  # HTTP + scheduler process together, from warm-up to the end
KINDS = ("normal", "stream", "aborted", "bad", "constrained", "oversized")


def _rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its children."""
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    total = 0
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def _one(url: str, kind: str, rng: random.Random) -> tuple[int, bool]:
    """Send one request of ``kind``; returns (status, whether the response was as expected)."""
    if kind == "normal":
        r = requests.post(
            url + "/generate",
            timeout=300,
            json={
                "text": f"Tell me about the number {rng.randint(0, 999)}.",
                "sampling_params": {"max_new_tokens": 8, "temperature": 0.7},
            },
        )
        return r.status_code, r.status_code == 200 and "text" in r.json()
    if kind == "stream":
        r = requests.post(
            url + "/v1/chat/completions",
            timeout=300,
            stream=True,
            json={
                "model": MODEL,
                "stream": True,
                "max_tokens": 8,
                "messages": [{"role": "user", "content": f"Say {rng.randint(0, 99)}"}],
            },
        )
        events = sse_events(r)
        return r.status_code, events[-1] == "[DONE]" and not any(
            isinstance(e, dict) and "error" in e for e in events
        )
    if kind == "aborted":
        r = requests.post(
            url + "/generate",
            timeout=300,
            stream=True,
            json={
                "text": "Write a long story.",
                "stream": True,
                "sampling_params": {"max_new_tokens": 200, "ignore_eos": True},
            },
        )
        lines = (ln for ln in r.iter_lines() if ln.startswith(b"data: "))
        next(lines)
        r.close()
        return r.status_code, r.status_code == 200
    if kind == "bad":
        _, path, body, _ = rng.choice(CASES)
        r = send_bad(url, path, body, MODEL, 8192)
        return r.status_code, 400 <= r.status_code < 500 and "error" in r.json()
    if kind == "constrained":
        r = requests.post(
            url + "/generate",
            timeout=300,
            json={
                "text": "Is the sky blue? Answer:",
                "sampling_params": {"max_new_tokens": 4, "temperature": 0, "regex": " ?(yes|no)"},
            },
        )
        return r.status_code, r.status_code == 200 and r.json()["text"].strip() in ("yes", "no")
    r = requests.post(
        url + "/generate",
        timeout=300,
        data='{"text": "' + "a" * (5 * 2**20) + '"}',
        headers={"Content-Type": "application/json"},
    )
    return r.status_code, r.status_code == 413


def test_soak_mixed_traffic(real_model_path, tmp_path):
    seconds = float(os.environ.get("PLAIT_SOAK_SECONDS", "30"))
    server = start_server(
        ["--device", "cpu", "--max-running-requests", "16"], tmp_path / "soak.log", real_model_path
    )
    try:
        sent, ok, statuses, errors = Counter(), Counter(), Counter(), []
        lock = threading.Lock()
        deadline = time.monotonic() + seconds
        warm = time.monotonic() + min(10.0, seconds / 6)
        rss: dict[str, float] = {}

        def worker(i: int) -> None:
            rng = random.Random(i)
            n = i
            while time.monotonic() < deadline:
                kind = KINDS[n % len(KINDS)]
                n += 1
                try:
                    status, good = _one(server.url, kind, rng)
                except Exception as e:  # noqa: BLE001 - a lost response is a failure
                    status, good = None, False
                    errors.append(f"{kind}: {type(e).__name__}: {e}")
                with lock:
                    sent[kind] += 1
                    ok[kind] += good
                    statuses[status] += 1
                    if "warm" not in rss and time.monotonic() > warm:
                        rss["warm"] = _rss_mib(server.proc.pid)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(CONCURRENCY)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 600)
        info = wait_until_idle(server, timeout=60)
        rss["end"] = _rss_mib(server.proc.pid)
        report = {
            "seconds": seconds,
            "concurrency": CONCURRENCY,
            "sent": dict(sent),
            "as_expected": dict(ok),
            "statuses": {str(k): v for k, v in statuses.items()},
            "rss_warm_mib": round(rss.get("warm", rss["end"]), 1),
            "rss_end_mib": round(rss["end"], 1),
            "kv_free_at_end": info["available_kv_tokens"] + info["evictable_kv_tokens"],
            "kv_total": info["max_total_tokens"],
        }
        print("SOAK", json.dumps(report))
        assert not errors, errors[:5]
        assert not [s for s in statuses if s is None or s >= 500], statuses
        assert ok == sent, (ok, sent)
        assert info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0
        assert report["kv_free_at_end"] == report["kv_total"]
        assert report["rss_end_mib"] - report["rss_warm_mib"] < RSS_BOUND_MIB, report
        assert server.get("/health_generate").status_code == 200
    finally:
        assert server.stop() == 0
