"""End to end against ``plait serve`` with the real SmolLM2-135M-Instruct on CPU.

One server process serves the whole module; the SIGTERM test stops it, so it stays last.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import threading
from pathlib import Path

import openai
import pytest
import requests

from tests.server.bad_inputs import CASES, assert_openai_error, send_bad
from tests.server.conftest import start_server
from tests.server.sglang_venv import BENCH_PACKAGES, FRONTEND_PACKAGES, SGLANG_VERSION, sglang_venv
from tests.server.test_fuzz import fuzz
from tests.server.test_server_fake import wait_until_idle

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
GREEDY = {"temperature": 0, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def offline_engine(real_model_path):
    import plait

    engine = plait.Engine(model_path=real_model_path, device="cpu", max_running_requests=32)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def sglang_python() -> str:
    """A venv holding the real sglang frontend (no torch), made once and cached in /tmp."""
    venv = Path(os.environ.get("PLAIT_SGLANG_VENV", f"/tmp/plait-sglang-{SGLANG_VERSION}"))
    try:
        return str(sglang_venv(venv, FRONTEND_PACKAGES))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"could not install sglang=={SGLANG_VERSION}: {e}")


@pytest.fixture(scope="session")
def sglang_bench_python() -> str:
    """A venv that runs ``python -m sglang.bench_serving`` (with torch), cached in /tmp."""
    venv = Path(
        os.environ.get("PLAIT_SGLANG_BENCH_VENV", f"/tmp/plait-sglang-bench-{SGLANG_VERSION}")
    )
    try:
        return str(sglang_venv(venv, BENCH_PACKAGES))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"could not install sglang=={SGLANG_VERSION} for bench_serving: {e}")


def test_openai_sdk_chat_plain_and_streaming_agree(real_server):
    client = openai.OpenAI(base_url=real_server.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0
    )
    text = plain.choices[0].message.content
    assert "Paris" in text
    assert plain.usage.completion_tokens <= 8 and plain.usage.prompt_tokens > 10
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same prompt, now cached


def test_openai_sdk_completions_with_logprobs(real_server):
    client = openai.OpenAI(base_url=real_server.url + "/v1", api_key="unused")
    r = client.completions.create(
        model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(" 4")
    assert len(lp.tokens) == len(lp.token_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_json_schema_response_format_yields_valid_json(real_server):
    client = openai.OpenAI(base_url=real_server.url + "/v1", api_key="unused")
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Which city is France's capital?"}],
        max_tokens=24,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert "city" in json.loads(r.choices[0].message.content)


def test_generate_batch_matches_single_requests(real_server):
    prompts = ["The capital of France is", "The capital of Japan is"]
    batch = real_server.post(
        "/generate", json={"text": prompts, "sampling_params": GREEDY, "return_logprob": True}
    ).json()
    assert isinstance(batch, list) and len(batch) == 2
    for prompt, out in zip(prompts, batch):
        single = real_server.post(
            "/generate", json={"text": prompt, "sampling_params": GREEDY}
        ).json()
        assert out["text"] == single["text"]
        assert (
            len(out["meta_info"]["output_token_logprobs"]) == out["meta_info"]["completion_tokens"]
        )


def test_32_concurrent_greedy_requests_match_offline_engine(real_server, offline_engine):
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(32)]
    expected = offline_engine.generate(prompt=prompts, sampling_params=GREEDY)

    def one(prompt):
        return real_server.post(
            "/generate", json={"text": prompt, "sampling_params": GREEDY}
        ).json()

    with cf.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, prompts))
    assert [g["output_ids"] for g in got] == [e["output_ids"] for e in expected]
    assert [g["text"] for g in got] == [e["text"] for e in expected]


@pytest.mark.parametrize("case_id,path,body,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_400_with_an_openai_error_body(real_server, case_id, path, body, param):
    resp = send_bad(real_server.url, path, body, MODEL, 8192)
    assert_openai_error(resp, 400, param)


def test_bad_input_never_loses_another_requests_work(real_server, offline_engine):
    prompt = "Write a short poem about the sea."
    sp = {"temperature": 0, "max_new_tokens": 24}
    expected = offline_engine.generate(prompt=prompt, sampling_params=sp)["text"]
    result = {}
    t = threading.Thread(
        target=lambda: result.setdefault(
            "out",
            real_server.post("/generate", json={"text": prompt, "sampling_params": sp}).json(),
        )
    )
    t.start()
    for _, path, body, _ in CASES:
        send_bad(real_server.url, path, body, MODEL, 8192)
    t.join(120)
    assert result["out"]["text"] == expected
    assert real_server.get("/health_generate").status_code == 200


def test_disconnect_mid_stream_aborts_and_frees_kv(real_server):
    before = wait_until_idle(real_server, timeout=60)
    r = real_server.post(
        "/generate",
        stream=True,
        json={
            "text": "Tell me a very long story.",
            "stream": True,
            "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True},
        },
    )
    data_lines = (line for line in r.iter_lines() if line.startswith(b"data: "))
    for _ in range(8):
        next(data_lines)
    assert real_server.get("/get_server_info").json()["num_running_reqs"] == 1
    r.close()
    after = wait_until_idle(real_server, timeout=30)
    assert after["num_running_reqs"] == 0
    assert after["available_kv_tokens"] + after["evictable_kv_tokens"] == after["max_total_tokens"]
    assert after["generated_tokens"] - before["generated_tokens"] < 1000  # it stopped early


def test_sglang_frontend_program_runs_unchanged(real_server, sglang_python):
    program = Path(__file__).with_name("sglang_program.py")
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    done = subprocess.run(
        [sglang_python, str(program), real_server.url],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    direct = real_server.post(
        "/generate",
        json={
            "text": "Q: What is the capital of France?\nA:",
            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "stop": "\n"},
        },
    ).json()
    assert out["answer"] == direct["text"] and "Paris" in out["answer"]
    assert out["color"] in (" blue", " green", " banana")
    assert out["fork_text"].startswith("Name a fruit.\nBoth: ")
    assert out["batch"][0] == out["answer"] and len(out["batch"]) == 2
    assert out["stream"] == out["answer"]


def test_logit_bias_forces_a_token_through_every_api(real_server):
    forced = 12345
    native = real_server.post(
        "/generate",
        json={
            "text": "The capital of France is",
            "sampling_params": {**GREEDY, "logit_bias": {str(forced): 100}},
        },
    ).json()
    assert native["output_ids"] == [forced] * GREEDY["max_new_tokens"]
    client = openai.OpenAI(base_url=real_server.url + "/v1", api_key="unused")
    r = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
        logit_bias={str(forced): 100},
    )
    assert r.choices[0].text == native["text"]
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
        logit_bias={str(forced): 100},
    )
    assert chat.choices[0].message.content == native["text"]


def test_chat_logprob_bytes_rebuild_cjk_and_emoji_text(real_server):
    """The regex makes the model spell CJK and an emoji, which SmolLM2's byte-level BPE
    splits into tokens holding parts of characters."""
    client = openai.OpenAI(base_url=real_server.url + "/v1", api_key="unused")
    target = "你好，世界🙂"
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello world in Chinese."}],
        max_tokens=32,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"regex": target},
    )
    assert r.choices[0].message.content == target
    content = r.choices[0].logprobs.content
    assert content[-1].token == "<|im_end|>"  # EOS: a logprob entry, not text
    assert b"".join(bytes(t.bytes) for t in content[:-1]) == target.encode()
    assert any(t.token.startswith("bytes:") for t in content)
    replacement = list("\ufffd".encode())
    assert all(t.bytes != replacement for t in content)
    for e in content + [x for t in content for x in t.top_logprobs]:
        if e.token.startswith("bytes:"):  # a partial character: its bytes are not text
            with pytest.raises(UnicodeDecodeError):
                bytes(e.bytes).decode()
        else:
            assert bytes(e.bytes).decode() == e.token


@pytest.mark.parametrize("backend", ["sglang", "sglang-oai", "sglang-oai-chat"])
def test_sglang_bench_serving_runs_unchanged(real_server, sglang_bench_python, backend, tmp_path):
    """SGLang's own benchmark client, as shipped; it sends every field it knows (``/generate``
    gets ``return_routed_experts: false``, ``lora_path: null``) and fails at its warm-up
    request on any 4xx."""
    out = tmp_path / "bench.jsonl"
    env = {
        **os.environ,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": "",
    }
    done = subprocess.run(
        [
            sglang_bench_python,
            "-m",
            "sglang.bench_serving",
            "--backend",
            backend,
            "--base-url",
            real_server.url,
            "--tokenizer",
            real_server.model_path,
            "--dataset-name",
            "random-ids",
            "--random-input-len",
            "8",
            "--random-output-len",
            "4",
            "--random-range-ratio",
            "1",
            "--num-prompts",
            "4",
            "--disable-tqdm",
            "--output-file",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads(out.read_text().splitlines()[-1])
    assert result["completed"] == 4, result
    assert result["total_output_tokens"] == 16  # ignore_eos: 4 tokens each


def test_json_object_response_format_yields_a_json_object(real_server):
    client = openai.OpenAI(base_url=real_server.url + "/v1", api_key="unused")
    r = client.chat.completions.create(
        model=MODEL,
        max_tokens=128,
        temperature=0,
        response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    c = client.completions.create(
        model=MODEL,
        prompt="A JSON object with a name:",
        max_tokens=128,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert isinstance(json.loads(c.choices[0].text), dict)


def test_fuzzed_requests_never_get_a_5xx(real_server):
    failures = fuzz(real_server.url, 6)
    assert not failures, failures[:5]
    assert real_server.get("/health_generate").status_code == 200


def test_metrics_after_traffic(real_server):
    text = real_server.get("/metrics").text
    assert "plait_time_to_first_token_seconds_count" in text
    count = [
        line
        for line in text.splitlines()
        if line.startswith("plait_time_to_first_token_seconds_count")
    ][0]
    assert float(count.split()[-1]) > 30


def test_sigterm_shuts_down_gracefully_with_exit_0(make_tiny_model, tmp_path):
    """A real engine's server, SIGTERMed with a stream in flight, finishes it and exits 0. On
    a server of its own (the session's ``real_server`` serves other modules after this one)
    and a tiny random Llama: the shutdown path is the same for any checkpoint, and SmolLM2's
    load and weight prepacking made this start the test's cost. (The fake engine's drain of
    queued requests: test_reliability.py; real multi-rank servers: test_server_tp/_pp.py.)"""
    server = start_server(
        ["--device", "cpu"], tmp_path / "sigterm.log", str(make_tiny_model("llama"))
    )
    events: list[bytes] = []
    started = threading.Event()

    def stream() -> None:  # read as it comes: the drain must not wait on a full socket
        r = requests.post(
            server.url + "/generate",
            stream=True,
            timeout=60,
            json={
                "text": "Count to five:",
                "stream": True,
                "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True},
            },
        )
        for line in r.iter_lines():
            if line.startswith(b"data: "):
                events.append(line)
                started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    assert server.get("/get_server_info").json()["num_running_reqs"] == 1  # in flight
    assert server.stop(timeout=60) == 0
    reader.join(30)
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2][6:])["meta_info"]["completion_tokens"] == 400  # not cut
