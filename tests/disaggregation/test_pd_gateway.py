"""``plait serve --pd 1P1D`` with the real SmolLM2: real processes on 127.0.0.1, KV moved by
Mooncake over TCP, requests through SGLang's real gateway in PD mode.

One launch for the module (on 2 cores every start costs seconds); the test that kills the
prefill server runs last. The unified reference is ``plait.Engine`` in this process: the same
engine a unified ``plait serve`` runs.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

import plait
from plait.core.messages import GenerateReq
from tests.server.conftest import start_server
from tests.server.test_data_parallel import child_pids
from tests.server.test_server_fake import sse_events

pytestmark = pytest.mark.slow

PROMPTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):\n    " * 5,
    "Once upon a time, in a quiet village by the sea, " * 15,
]
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
TIMEOUT = 8  # --disaggregation-transfer-timeout


@pytest.fixture(scope="module")
def pd(smollm_dir, tmp_path_factory):
    from plait.server.children import PortBook
    from tests.server.test_launcher_ports import free_range

    base, bootstrap = free_range(2), free_range(1)  # every process's port pinned
    book = PortBook(base, base + 1, bootstrap)
    port, metrics = book.take(), book.take()
    server = start_server(
        [
            "--device",
            "cpu",
            "--pd",
            "1P1D",
            "--gateway",
            "sglang-router",  # the failure tests below pin 0.3.2's behaviour (smg: test_pd_smg.py)
            "--router-dp-worker-base-port",
            str(base),
            "--disaggregation-bootstrap-base-port",
            str(bootstrap),
            "--router-prometheus-port",
            str(metrics),
            "--max-total-tokens",
            "8192",
            "--disaggregation-transfer-timeout",
            str(TIMEOUT),
        ],
        tmp_path_factory.mktemp("pd") / "pd.log",
        str(smollm_dir),
        port=port,
    )
    server.pinned = {"prefill": [base, bootstrap], "decode": [base + 1], "gateway": [port, metrics]}
    server.children = {}
    for pid in child_pids(server.proc.pid):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        if "--disaggregation-mode" in cmd:
            mode = cmd[cmd.index("--disaggregation-mode") + 1]
            server.children[mode] = (pid, f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}")
    assert set(server.children) == {"prefill", "decode"}
    yield server
    server.stop()


@pytest.fixture(scope="module")
def unified(smollm_dir):
    engine = plait.Engine(model_path=smollm_dir, device="cpu")
    yield engine
    engine.shutdown()


def gen(url: str, text: str, **extra) -> requests.Response:
    return requests.post(
        url + "/generate", timeout=300, json={"text": text, "sampling_params": GREEDY, **extra}
    )


def info(url: str) -> dict:
    return requests.get(url + "/get_server_info", timeout=30).json()


def metric(url: str, name: str) -> float:
    for line in requests.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported by {url}")


def test_every_process_listens_on_its_pinned_port(pd):
    """Prefill on base (bootstrap on its pinned port), decode on base + 1, the gateway on
    --port and --router-prometheus-port."""
    from tests.server.test_launcher_ports import listening_ports

    for mode, (pid, url) in pd.children.items():
        assert int(url.rsplit(":", 1)[1]) == pd.pinned[mode][0]
        assert set(pd.pinned[mode]) <= listening_ports(pid), mode
    servers = {pid for pid, _ in pd.children.values()}
    (gateway,) = [p for p in child_pids(pd.proc.pid) if p not in servers]
    assert set(pd.pinned["gateway"]) <= listening_ports(gateway)


def test_generate_equals_unified_token_for_token_streaming_or_not(pd, unified):
    want = [o["output_ids"] for o in unified.generate(PROMPTS, dict(GREEDY))]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # a batch, arriving together
        got = list(pool.map(lambda p: gen(pd.url, p), PROMPTS))
    assert [r.status_code for r in got] == [200] * len(PROMPTS), [r.text for r in got]
    assert [r.json()["output_ids"] for r in got] == want
    r = requests.post(
        pd.url + "/generate",
        stream=True,
        timeout=300,
        json={"text": PROMPTS[3], "sampling_params": GREEDY, "stream": True},
    )
    events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["output_ids"] == want[3]


def test_chat_equals_unified(pd, unified):
    messages = [{"role": "user", "content": "Name a primary color."}]
    tok = unified.tokenizer
    ids = tok.encode(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    want = unified.generate(
        input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 16}
    )["text"]
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": messages,
        "temperature": 0,
        "max_tokens": 16,
    }
    r = requests.post(pd.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want
    r = requests.post(
        pd.url + "/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=300
    )
    chunks = [e for e in sse_events(r) if e != "[DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == want


def test_decode_computes_no_prompt_tokens_and_prefill_reuses_prefixes(pd):
    (_, prefill), (_, decode) = pd.children["prefill"], pd.children["decode"]
    base = "You are a helpful assistant who answers in one short sentence. " * 8
    before = info(prefill)["cached_tokens"]
    for q in ("What is two plus two?", "What colour is the sky?"):
        assert gen(pd.url, base + q).status_code == 200
    assert info(prefill)["cached_tokens"] - before > 80  # the second reused the shared prefix
    assert metric(decode, "plait_computed_prompt_tokens_total") == 0
    assert metric(prefill, "plait_computed_prompt_tokens_total") > 0
    d = info(decode)
    assert d["kv_transfers"] > 0 and d["kv_bytes_received"] > 0


def wait_kv_idle(url: str, within: float) -> None:
    """Until ``url`` runs nothing and holds no KV but its radix cache's; AssertionError if
    that takes longer than ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        d = info(url)
        if (
            d["num_running_reqs"] == 0
            and d["num_waiting_reqs"] == 0
            and d["available_kv_tokens"] + d["evictable_kv_tokens"] == d["max_total_tokens"]
        ):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} still holds KV after {within}s: {json.dumps(d)[:500]}")
        time.sleep(0.3)


def aborts(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=30).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('plait_requests_total{finish_reason="abort"}')
    )


def prefill_alone(pd, text: str, room: int) -> requests.Response:
    """The prefill half of a request whose decode half never comes: straight to the prefill
    server with the bootstrap fields the gateway would add."""
    pid, prefill = pd.children["prefill"]
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    port = int(cmd[cmd.index("--disaggregation-bootstrap-port") + 1])
    return gen(prefill, text, bootstrap_host="127.0.0.1", bootstrap_port=port, bootstrap_room=room)


@pytest.mark.parametrize("when", ["decoding", "prefilling"])
def test_client_disconnect_through_the_gateway_frees_both_sides(pd, when):
    """A streaming client that goes away mid-request ends it on both servers: the decode
    server ends it as an abort and frees its KV (pre-allocated or decoding) long before the
    2000 tokens it was asked for; the prefill server, if its half has not run yet, ends it as
    an abort too (once decoding has started, that half is done and its KV released)."""
    (_, prefill), (_, decode) = pd.children["prefill"], pd.children["decode"]
    aborts_before = aborts(prefill), aborts(decode)
    with ThreadPoolExecutor(1) as pool:
        if when == "prefilling":  # a long prompt ahead keeps ours in the prefill queue
            # (~4,300 tokens, seconds of prefill on 2 cores: 1,400 were done before the abort
            # arrived once prefill attention ran fused)
            busy = pool.submit(
                prefill_alone, pd, "Keep the prefill server busy for a while. " * 480, 4242
            )
            time.sleep(0.5)
        r = requests.post(
            pd.url + "/generate",
            stream=True,
            timeout=300,
            json={
                "text": "Abort me.",
                "stream": True,
                "sampling_params": {"temperature": 0, "max_new_tokens": 2000, "ignore_eos": True},
            },
        )
        assert r.status_code == 200, r.text
        if when == "decoding":
            lines = r.iter_lines()
            assert sum(1 for ln in itertools.islice(lines, 20) if ln.startswith(b"data:")) >= 3
        else:
            time.sleep(0.5)
        r.close()
        wait_kv_idle(decode, 15)  # 2000 tokens would take minutes here
        assert aborts(decode) == aborts_before[1] + 1
        if when == "prefilling":
            assert "no decode server asked" in busy.result().text
    wait_kv_idle(prefill, 10)
    assert aborts(prefill) == aborts_before[0] + (when == "prefilling")


def test_prefill_without_a_decode_target_times_out_and_frees_its_kv(pd):
    """The prefill half alone (its decode server never sends a target): it ends after the
    transfer timeout with an error naming the room, and its KV is released."""
    start = time.monotonic()
    r = prefill_alone(pd, "Nobody decodes this prompt.", 987654321)
    took = time.monotonic() - start
    assert "no decode server asked for the KV of bootstrap room 987654321" in r.text, r.text
    assert TIMEOUT - 1 < took < TIMEOUT + 30, took
    wait_kv_idle(pd.children["prefill"][1], 10)


def logprob_rows(meta: dict) -> list[tuple]:
    """(field, position, k, token, logprob) for every logprob entry of ``meta_info``."""
    rows = []
    for key in (
        "input_token_logprobs",
        "input_top_logprobs",
        "output_token_logprobs",
        "output_top_logprobs",
    ):
        for pos, entry in enumerate(meta[key]):
            for k, e in enumerate((entry or []) if "top" in key else [entry]):
                rows.append((key, pos, k, e[1], e[0]))
    return rows


def test_logprobs_constraints_and_n_through_the_gateway_equal_unified(pd, unified):
    """What PD mode once refused: prompt and output logprobs (computed on the prefill server,
    sent with the KV, returned once by the decode server), a regex (the first token sampled
    under it on the prefill side, the decode side's grammar advanced past it) and n > 1 (a
    room per sample), each equal to a unified engine's output."""
    lp = {"return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2}
    want = unified.generate_request(
        [GenerateReq(text=PROMPTS[1], sampling_params=dict(GREEDY), **lp)]
    )[0]
    r = gen(pd.url, PROMPTS[1], **lp)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["output_ids"] == want["output_ids"]
    g, w = logprob_rows(got["meta_info"]), logprob_rows(want["meta_info"])
    assert len(got["meta_info"]["input_token_logprobs"]) == len(
        unified.tokenizer.encode(PROMPTS[1])
    )
    assert [x[:4] for x in g] == [x[:4] for x in w]
    assert [x[4] for x in g] == pytest.approx([x[4] for x in w], abs=1e-3)

    regex = {"temperature": 0, "max_new_tokens": 16, "regex": "(Paris|Lyon)[.!] [A-Z][a-z]+"}
    r = requests.post(
        pd.url + "/generate", timeout=300, json={"text": PROMPTS[1], "sampling_params": regex}
    )
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == unified.generate(PROMPTS[1], dict(regex))["output_ids"]

    r = requests.post(
        pd.url + "/generate",
        timeout=300,
        json={"text": PROMPTS[0], "sampling_params": {**GREEDY, "n": 2}},
    )
    assert r.status_code == 200, r.text
    want_n = unified.generate(PROMPTS[0], dict(GREEDY))["output_ids"]
    assert [o["output_ids"] for o in r.json()] == [want_n, want_n]


def test_killing_the_prefill_fails_waiting_requests_in_bounded_time(pd):
    (prefill_pid, _), (_, decode) = pd.children["prefill"], pd.children["decode"]
    long_prompt = "Tell me a very long story about the sea and its ships. " * 40

    def one(i: int) -> tuple[int, float]:
        start = time.monotonic()
        try:
            r = gen(pd.url, f"{i}: {long_prompt}")
            return r.status_code, time.monotonic() - start
        except requests.RequestException:
            return -1, time.monotonic() - start

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        time.sleep(1.5)  # the prefill server is busy with them
        os.kill(prefill_pid, signal.SIGKILL)
        results = [f.result(timeout=TIMEOUT + 60) for f in futures]
    assert any(status != 200 for status, _ in results), results
    assert all(took < TIMEOUT + 60 for _, took in results), results
    deadline = time.monotonic() + TIMEOUT + 10
    while time.monotonic() < deadline:
        d = info(decode)
        if (
            d["num_running_reqs"] == 0
            and d["available_kv_tokens"] + d["evictable_kv_tokens"] == d["max_total_tokens"]
        ):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"decode KV still in use: {json.dumps(d)[:500]}")
    assert requests.get(decode + "/health", timeout=10).status_code == 200
