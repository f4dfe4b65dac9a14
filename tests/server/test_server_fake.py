"""The whole server stack -- CLI, HTTP process, ZMQ, scheduler process -- with ``FakeEngine``
behind it: fast enough for every run, and exact about what the HTTP layer must do."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest
import requests

from tests.server.bad_inputs import CASES, assert_openai_error, send_bad
from tests.server.conftest import FAKE, start_server
from tests.server.fake_engine import CONTEXT_LENGTH, TOTAL_KV_TOKENS


def model_name(server) -> str:
    return server.get("/v1/models").json()["data"][0]["id"]


def sse_events(resp: requests.Response) -> list:
    """The stream's ``data:`` payloads, parsed.

    Lines are split as bytes: SSE ends a line only at CR or LF, and the server sends text
    unescaped (``ensure_ascii=False``, as SGLang does), so a sampled U+2028 or U+0085 is part
    of a payload; ``iter_lines(decode_unicode=True)`` would split there (str.splitlines).
    """
    events = []
    for raw in resp.iter_lines():
        line = raw.decode("utf-8")
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def wait_until_idle(server, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = server.get("/get_server_info").json()
        idle = (
            info["num_running_reqs"] == 0
            and info["available_kv_tokens"] + info["evictable_kv_tokens"]
            == info["max_total_tokens"]
        )
        if idle or time.monotonic() > deadline:
            return info
        time.sleep(0.1)


def test_generate_single_returns_text_and_meta_info(fake_server):
    r = fake_server.post(
        "/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 4}}
    )
    out = r.json()
    assert r.status_code == 200
    assert out["text"] == "hell"
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == 5 and meta["completion_tokens"] == 4
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert meta["id"] and meta["e2e_latency"] > 0 and "cached_tokens" in meta


def test_generate_batch_and_n_return_a_list_in_order(fake_server):
    r = fake_server.post(
        "/generate", json={"text": ["ab", "xyz"], "sampling_params": {"max_new_tokens": 3, "n": 2}}
    )
    texts = [o["text"] for o in r.json()]
    assert texts == ["aba", "aba", "xyz", "xyz"]


def test_generate_logprobs_carry_token_text_when_asked(fake_server):
    r = fake_server.post(
        "/generate",
        json={
            "input_ids": [104, 105],
            "sampling_params": {"max_new_tokens": 2},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": 2,
            "return_text_in_logprobs": True,
        },
    )
    meta = r.json()["meta_info"]
    assert meta["input_token_logprobs"][0][0] is None
    assert [e[1] for e in meta["output_token_logprobs"]] == [104, 105]
    assert all(isinstance(e[2], str) for e in meta["output_token_logprobs"])
    assert len(meta["output_top_logprobs"][0]) == 2


def test_generate_stream_is_cumulative_and_ends_with_done(fake_server):
    r = fake_server.post(
        "/generate",
        stream=True,
        json={"text": "abc", "sampling_params": {"max_new_tokens": 3}, "stream": True},
    )
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert events[-2]["text"] == "abc"
    assert events[-2]["meta_info"]["finish_reason"]["type"] == "length"


def test_max_new_tokens_zero_prefills_only(fake_server):
    out = fake_server.post(
        "/generate", json={"text": "prefix", "sampling_params": {"max_new_tokens": 0}}
    ).json()
    assert out["text"] == "" and out["meta_info"]["prompt_tokens"] == 6


def test_openai_sdk_chat_completions_plain_and_streaming(fake_server):
    client = openai.OpenAI(base_url=fake_server.url + "/v1", api_key="unused")
    model = model_name(fake_server)
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=1,
    )
    assert r.choices[0].finish_reason == "length"
    assert len(r.choices[0].logprobs.content) == 4
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens_details.cached_tokens == 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 4


def test_openai_sdk_completions_with_n_echo_and_logprobs(fake_server):
    client = openai.OpenAI(base_url=fake_server.url + "/v1", api_key="unused")
    r = client.completions.create(
        model=model_name(fake_server), prompt=["ab", "cd"], n=2, max_tokens=3, logprobs=1, echo=True
    )
    assert [c.text for c in r.choices] == ["ababa", "ababa", "cdcdc", "cdcdc"]
    assert r.choices[0].logprobs.tokens[:2] == ["a", "b"]
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 12


@pytest.mark.parametrize("case_id,path,body,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_400_with_an_openai_error_body(fake_server, case_id, path, body, param):
    resp = send_bad(fake_server.url, path, body, model_name(fake_server), CONTEXT_LENGTH)
    assert_openai_error(resp, 400, param)


def test_error_raised_inside_the_engine_is_a_400_not_a_crash(fake_server):
    r = fake_server.post(
        "/generate", json={"text": "hi", "sampling_params": {"regex": "(?P<boom>"}}
    )
    assert_openai_error(r, 400)
    r = fake_server.post(
        "/generate", json={"text": "hi", "stream": True, "sampling_params": {"regex": "(?P<boom>"}}
    )
    assert_openai_error(r, 400)
    assert fake_server.get("/health").status_code == 200


def test_bad_input_never_loses_another_requests_work(fake_server):
    result = {}

    def good():
        result["out"] = fake_server.post(
            "/generate", json={"text": "steady", "sampling_params": {"max_new_tokens": 60}}
        ).json()

    t = threading.Thread(target=good)
    t.start()
    for _, path, body, _ in CASES:
        send_bad(fake_server.url, path, body, model_name(fake_server), CONTEXT_LENGTH)
    t.join(60)
    assert result["out"]["meta_info"]["completion_tokens"] == 60
    assert result["out"]["text"] == ("steady" * 10)


def test_client_disconnect_mid_stream_aborts_and_frees_kv(fake_server):
    r = fake_server.post(
        "/generate",
        stream=True,
        json={"text": "long", "sampling_params": {"max_new_tokens": 400}, "stream": True},
    )
    lines = r.iter_lines()
    for _ in range(6):
        next(lines)
    busy = fake_server.get("/get_server_info").json()
    assert busy["num_running_reqs"] == 1
    r.close()
    info = wait_until_idle(fake_server)
    assert info["num_running_reqs"] == 0
    assert info["available_kv_tokens"] == TOTAL_KV_TOKENS


def test_client_disconnect_while_waiting_for_a_plain_response_aborts(fake_server):
    with pytest.raises(requests.Timeout):
        requests.post(
            fake_server.url + "/generate",
            timeout=0.5,
            json={"text": "long", "sampling_params": {"max_new_tokens": 400}},
        )
    info = wait_until_idle(fake_server)
    assert info["num_running_reqs"] == 0 and info["available_kv_tokens"] == TOTAL_KV_TOKENS


def test_abort_request_finishes_the_request_with_abort(fake_server):
    result = {}
    t = threading.Thread(
        target=lambda: result.setdefault(
            "out",
            fake_server.post(
                "/generate",
                json={"text": "x", "rid": "to-abort", "sampling_params": {"max_new_tokens": 400}},
            ).json(),
        )
    )
    t.start()
    time.sleep(0.5)
    assert fake_server.post("/abort_request", json={"rid": "to-abort"}).json()["aborted"] == [
        "to-abort"
    ]
    t.join(10)
    assert result["out"]["meta_info"]["finish_reason"]["type"] == "abort"


def test_admin_routes(fake_server):
    assert fake_server.get("/health").status_code == 200
    assert fake_server.get("/health_generate").status_code == 200
    info = fake_server.get("/get_model_info").json()
    assert info["is_generation"] and info["context_length"] == CONTEXT_LENGTH
    assert fake_server.post("/flush_cache").status_code == 200
    assert fake_server.get("/server_info").json()["max_total_tokens"] == TOTAL_KV_TOKENS


def test_metrics_expose_queue_usage_latency_and_throughput(fake_server):
    fake_server.post("/generate", json={"text": "m", "sampling_params": {"max_new_tokens": 3}})
    text = fake_server.get("/metrics").text
    for name in (
        "plait_num_queue_reqs",
        "plait_num_running_reqs",
        "plait_token_usage",
        "plait_cache_hit_rate",
        "plait_time_to_first_token_seconds_bucket",
        "plait_inter_token_latency_seconds_bucket",
        "plait_gen_throughput",
        "plait_generation_tokens_total",
    ):
        assert name in text, name


def test_api_key_is_required_when_set(tiny_model_dir, tmp_path):
    server = start_server(
        FAKE, tmp_path / "key.log", str(tiny_model_dir), api_key="s3cret", timeout=120
    )
    try:
        url = server.url
        assert_openai_error(requests.get(url + "/v1/models"), 401)
        assert_openai_error(
            requests.post(
                url + "/generate", json={"text": "x"}, headers={"Authorization": "Bearer wrong"}
            ),
            401,
        )
        assert requests.get(url + "/health").status_code == 200
        lower = requests.post(
            url + "/generate",
            headers={"Authorization": "bearer s3cret"},
            json={"text": "x", "sampling_params": {"max_new_tokens": 1}},
        )
        assert lower.status_code == 200  # the auth scheme is case-insensitive
        ok = requests.post(
            url + "/generate",
            headers=server.headers(),
            json={"text": "x", "sampling_params": {"max_new_tokens": 1}},
        )
        assert ok.status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret")
        assert client.models.list().data[0].id == tiny_model_dir.name
        # SIGTERM with a stream in flight: graceful, exit 0, the stream completes.
        streamed = {}

        def stream():
            r = requests.post(
                url + "/generate",
                headers=server.headers(),
                stream=True,
                json={"text": "x", "stream": True, "sampling_params": {"max_new_tokens": 50}},
            )
            streamed["events"] = sse_events(r)

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.2)
        assert server.stop() == 0
        t.join(10)
        assert streamed["events"][-1] == "[DONE]"
    finally:
        server.stop()


def test_a_dead_scheduler_process_means_503s_and_a_non_zero_exit(tiny_model_dir, tmp_path):
    import glob
    import os
    import signal
    import tempfile

    server = start_server(FAKE, tmp_path / "dead.log", str(tiny_model_dir), timeout=120)
    try:
        ipc = glob.glob(os.path.join(tempfile.gettempdir(), f"plait-ipc-{server.proc.pid}-*"))
        assert len(ipc) == 1
        children = [
            int(p)
            for p in open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read().split()
        ]
        waiting = {}
        t = threading.Thread(
            target=lambda: waiting.setdefault(
                "r",
                server.post(
                    "/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 400}}
                ),
            )
        )
        t.start()
        time.sleep(0.5)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        t.join(10)
        assert_openai_error(waiting["r"], 503)
        # the server does not linger half-dead: it exits non-zero so a supervisor restarts it
        assert server.proc.wait(timeout=15) != 0
        assert not os.path.exists(ipc[0])
    finally:
        server.stop()
