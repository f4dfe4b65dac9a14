"""``plait serve --dp 2`` with the real SmolLM2 behind the real gateway: every client works
through it, greedy outputs equal a single worker's, and cache-aware routing pays.

Two launches in all (cache_aware, then round_robin for the comparison), each run once and
shared by the module's tests: on 2 cores every worker start costs seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import openai
import pytest
import requests

import plait as pl
from plait.server.data_parallel import PortBook
from tests.server.conftest import start_server
from tests.server.test_data_parallel import child_worker_urls
from tests.server.test_server_fake import sse_events
from tests.server.test_server_real import MODEL, sglang_python  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "List three colors:",
]
GREEDY = {"temperature": 0, "max_new_tokens": 12}


def launch(tmp: Path, model_path: str, policy: str):
    book = PortBook()  # the gateway's port and its metrics' port must differ
    port, metrics = book.take(), book.take()
    server = start_server(
        [
            "--device",
            "cpu",
            "--dp",
            "2",
            "--gateway",
            "sglang-router",  # the 0.3.2-specific checks below (smg: test_smg_gateway.py)
            "--router-policy",
            policy,
            "--max-running-requests",
            "16",
            "--router-prometheus-port",
            str(metrics),
        ],
        tmp / f"dp-{policy}.log",
        model_path,
        port=port,
    )
    server.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
    return server


@pytest.fixture(scope="module")
def dp_server(real_model_path, tmp_path_factory):
    server = launch(tmp_path_factory.mktemp("dp-real"), real_model_path, "cache_aware")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker_url(dp_server) -> str:
    """One worker, addressed directly: the single-worker reference."""
    return child_worker_urls(dp_server)[0]


def generate(url: str, text: str, **extra) -> dict:
    r = requests.post(
        url + "/generate", json={"text": text, "sampling_params": GREEDY, **extra}, timeout=300
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_through_the_gateway_equals_a_single_worker(dp_server, worker_url):
    for prompt in PROMPTS:
        assert generate(dp_server.url, prompt)["text"] == generate(worker_url, prompt)["text"]
    r = requests.post(
        dp_server.url + "/generate",
        stream=True,
        timeout=300,
        json={"text": PROMPTS[0], "sampling_params": GREEDY, "stream": True},
    )
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert events[-2]["text"] == generate(worker_url, PROMPTS[0])["text"]


def test_openai_sdk_through_the_gateway(dp_server, worker_url):
    via_gateway = openai.OpenAI(base_url=dp_server.url + "/v1", api_key="x")
    direct = openai.OpenAI(base_url=worker_url + "/v1", api_key="x")
    for client_kwargs in ({"stream": False}, {"stream": True}):
        outs = []
        for client in (via_gateway, direct):
            chat = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Name a fruit."}],
                max_tokens=10,
                temperature=0,
                **client_kwargs,
            )
            if client_kwargs["stream"]:
                outs.append("".join(c.choices[0].delta.content or "" for c in chat if c.choices))
            else:
                outs.append(chat.choices[0].message.content)
        assert outs[0] == outs[1] and outs[0]
    comps = [
        c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=0)
        for c in (via_gateway, direct)
    ]
    assert comps[0].choices[0].text == comps[1].choices[0].text


def run_sglang_program(python: str, url: str, *flags: str) -> subprocess.CompletedProcess:
    program = Path(__file__).with_name("sglang_program.py")
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    return subprocess.run(
        [python, str(program), url, *flags], capture_output=True, text=True, timeout=300, env=env
    )


def test_sglang_frontend_through_the_gateway(dp_server, sglang_python):  # noqa: F811
    """gen, fork/join, run_batch and streaming work through the gateway. ``select`` does not:
    sglang's frontend sends its choices as a batch of texts, which sglang-router 0.3.2 itself
    refuses (its request type takes one string), so it fails the same way in front of SGLang's
    own servers; the test pins that the refusal is the gateway's, not a worker's."""
    done = run_sglang_program(sglang_python, dp_server.url, "--no-select")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "Paris" in out["answer"] and out["stream"] == out["answer"]
    assert out["fork_text"].startswith("Name a fruit.\nBoth: ")
    assert out["batch"][0] == out["answer"] and len(out["batch"]) == 2
    refused = run_sglang_program(sglang_python, dp_server.url)
    assert "Failed to deserialize the JSON body" in refused.stderr
    r = requests.post(
        dp_server.url + "/generate",
        timeout=60,
        json={"text": ["a", "b"], "sampling_params": {"max_new_tokens": 1}},
    )
    assert r.status_code in (400, 422) and "expected a string" in r.text


def test_plait_frontend_backends_through_the_gateway(dp_server, worker_url, real_model_path):
    @pl.function
    def qa(s, question):
        s += pl.user(question)
        s += pl.assistant(pl.gen("answer", max_tokens=10))

    @pl.function
    def pick(s):
        s += "The opposite of hot is" + pl.select("x", [" cold", " warm"])

    native = qa.run(question="What is 2+2?", temperature=0, backend=pl.RuntimeEndpoint(worker_url))
    gateway = qa.run(
        question="What is 2+2?", temperature=0, backend=pl.RuntimeEndpoint(dp_server.url)
    )
    via_openai = qa.run(
        question="What is 2+2?",
        temperature=0,
        backend=pl.OpenAI(
            MODEL, base_url=dp_server.url + "/v1", api_key="x", tokenizer_path=real_model_path
        ),
    )
    assert gateway.error() is None and via_openai.error() is None
    assert gateway["answer"] == native["answer"] == via_openai["answer"]
    assert (
        pick.run(backend=pl.RuntimeEndpoint(dp_server.url))["x"]
        == pick.run(backend=pl.RuntimeEndpoint(worker_url))["x"]
    )


def finished_requests(url: str) -> float:
    """Requests a worker has finished, any finish reason (its ``plait_requests_total``)."""
    text = requests.get(url + "/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("plait_requests_total{")
    )


def gateway_metric(server, name: str, label: str = "") -> dict[str, float]:
    """One of the gateway's per-worker series (those whose labels hold ``label``): worker URL
    -> value."""
    text = requests.get(server.metrics_url, timeout=30).text
    series = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            labels, value = line.rsplit(" ", 1)
            worker = labels.split('worker="', 1)[1].split('"', 1)[0]
            series[worker] = series.get(worker, 0.0) + float(value)
    return series


def test_client_errors_do_not_take_a_healthy_worker_out_of_service(dp_server):
    """sglang-router 0.3.2 counts a worker's 4xx answers as circuit-breaker failures, so Plait
    turns its breaker off (dead workers are found by health checks). Requests the workers
    refuse with 400 are the client's fault, not the worker's: after thirty in a row (each the
    worker's own JSON 400 naming the parameter, passed through unretried), every worker is
    still healthy in the gateway's eyes and the worker that refused them still serves.

    (0.3.2's cache-aware policy sends unrelated sequential prompts to one worker, with or
    without bad requests, so the check follows the prefix: a good prompt that starts with the
    bad one goes to the worker holding that prefix, unless the gateway took it out.)"""
    bad_text = "A bad request about the weather in Paris"
    earlier = gateway_metric(dp_server, "smg_worker_cb_outcomes_total", 'outcome="failure"')
    for _ in range(30):
        r = requests.post(
            dp_server.url + "/generate",
            timeout=60,
            json={"text": bad_text, "sampling_params": {"temperature": -1}},
        )
        assert r.status_code == 400, (r.status_code, r.text)
        assert r.json()["error"]["param"].endswith("temperature"), r.text
    # The workers the gateway counted the refusals against (0.3.2 still counts them, breaker
    # off or on): the ones a failure-counting gateway would have taken out.
    failures = {
        w: n - earlier.get(w, 0.0)
        for w, n in gateway_metric(
            dp_server, "smg_worker_cb_outcomes_total", 'outcome="failure"'
        ).items()
    }
    assert sum(failures.values()) == 30, failures  # each refusal counted once: none retried
    blamed = {w for w, n in failures.items() if n}
    health = gateway_metric(dp_server, "smg_worker_health")
    assert sorted(health) == sorted(child_worker_urls(dp_server)), health
    assert set(health.values()) == {1.0}, health
    before = {w: finished_requests(w) for w in health}
    for i in range(16):
        generate(
            dp_server.url,
            f"{bad_text}, asked again {i}",
            sampling_params={"temperature": 0, "max_new_tokens": 1},
        )
        served = {w: finished_requests(w) - before[w] for w in health}
        if all(served[w] for w in blamed):
            break
    assert all(served[w] >= 1 for w in blamed), f"served after the bad ones: {served}"


def multi_tenant_cached_share(url: str, tenants: int = 3, rounds: int = 4) -> float:
    """Each tenant has a long system prompt; their requests interleave (an odd tenant count, so
    round robin does not happen to pin each tenant to one worker). Returns the share of
    prompt tokens served from a worker's radix cache."""
    prompt_tokens = cached = 0
    for r in range(rounds):
        for t in range(tenants):
            system = f"You are assistant number {t}. " + f"Tenant {t} rules: be brief. " * 40
            body = generate(
                url,
                system + f"\nQuestion {r}: say hi.",
                sampling_params={"temperature": 0, "max_new_tokens": 1},
            )
            prompt_tokens += body["meta_info"]["prompt_tokens"]
            cached += body["meta_info"]["cached_tokens"]
    return cached / prompt_tokens


def test_cache_aware_routing_reuses_more_prefix_than_round_robin(
    dp_server, real_model_path, tmp_path
):
    """The module's last test: it stops the cache-aware launch before starting the round-robin
    one, so two SmolLM2 workers are alive here, not four (with the session's real server,
    five had taken 13 GiB)."""
    requests.post(dp_server.url + "/flush_cache", timeout=60)
    cache_aware = multi_tenant_cached_share(dp_server.url)
    assert dp_server.stop() == 0
    rr = launch(tmp_path, real_model_path, "round_robin")
    try:
        round_robin = multi_tenant_cached_share(rr.url)
    finally:
        assert rr.stop() == 0
    print(f"cached-token share: cache_aware {cache_aware:.3f}, round_robin {round_robin:.3f}")
    assert cache_aware > round_robin
