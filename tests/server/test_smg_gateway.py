"""smg (SGLang Model Gateway 1.x) in gRPC mode in front of Plait gRPC workers, with fake engines:
real processes on 127.0.0.1 (``plait serve --dp 2 --grpc-mode``, a worker that ``--join``s),
the unmodified ``openai`` SDK.

One launch serves the module, in file order: the OpenAI and native routes (equal to a single
HTTP worker's answers), tool calls and reasoning parsed by the gateway, a worker added and
then removed under load, and last a worker killed with requests in flight.

The fake engine echoes its prompt, so with this module's chat template (the messages' text,
nothing else) a chat reply is the user's message: the gateway's parsers see exactly what the
test wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai
import pytest
import requests
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from plait.server.children import PortBook
from plait.server.gateway import listed_healthy
from tests.server.conftest import FAKE, REPO, start_server
from tests.server.test_data_parallel import child_pids, wait_gone

pytestmark = pytest.mark.slow  # three gateway-managed processes and two more workers

ECHO_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
DELAY = {"FAKE_ENGINE_TOKEN_DELAY": "0.01"}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def echo_model(tmp_path_factory) -> Path:
    from tests.server.fake_engine import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path_factory.mktemp("echo-model"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = ECHO_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


@pytest.fixture(scope="module")
def gateway(echo_model, tmp_path_factory):
    book = PortBook()
    port, metrics = book.take(), book.take()
    server = start_server(
        [
            *FAKE,
            "--dp",
            "2",
            "--grpc-mode",
            "--router-policy",
            "round_robin",
            "--router-prometheus-port",
            str(metrics),
            "--router-extra-args",
            "--tool-call-parser qwen --reasoning-parser qwen3",
        ],
        tmp_path_factory.mktemp("smg") / "gateway.log",
        str(echo_model),
        env=DELAY,
        timeout=300,
        port=port,
    )
    wait_for_workers(server, 2)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def http_worker(echo_model, tmp_path_factory):
    """One HTTP worker on the same model: the reference."""
    server = start_server(FAKE, tmp_path_factory.mktemp("http") / "w.log", str(echo_model))
    yield server
    server.stop()


def model_of(url: str) -> str:
    """The served model id: in gRPC mode smg routes by it (another name finds no worker)."""
    return requests.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)


def answers(client: openai.OpenAI, model: str) -> list[str]:
    """Chat and completions, streamed and not."""
    out = []
    for stream in (False, True):
        chat = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Name a fruit."}],
            max_tokens=8,
            temperature=0,
            stream=stream,
        )
        comp = client.completions.create(
            model=model, prompt="def fib(n):", max_tokens=8, temperature=0, stream=stream
        )
        if stream:
            out.append("".join(c.choices[0].delta.content or "" for c in chat if c.choices))
            out.append("".join(c.choices[0].text for c in comp if c.choices))
        else:
            out += [chat.choices[0].message.content, comp.choices[0].text]
    return out


def test_openai_and_generate_through_smg_equal_a_single_http_worker(gateway, http_worker):
    model = sdk(gateway.url).models.list().data[0].id
    via_gateway = answers(sdk(gateway.url), model)
    assert via_gateway == answers(sdk(http_worker.url), model)
    assert via_gateway[0] == "Name a f"  # the echo: the gateway decoded the worker's tokens
    body = {"model": model, "text": "Paris is", "sampling_params": {"max_new_tokens": 5}}
    native = requests.post(gateway.url + "/generate", json=body, timeout=60)
    direct = requests.post(http_worker.url + "/generate", json=body, timeout=60)
    assert native.status_code == 200, native.text
    assert native.json()[0]["output_ids"] == direct.json()["output_ids"]
    assert native.json()[0]["text"] == direct.json()["text"] == "Paris"


def test_a_bad_request_is_the_workers_refusal_naming_the_field(gateway):
    r = requests.post(
        gateway.url + "/v1/completions",
        json={"model": model_of(gateway.url), "prompt": "hi", "max_tokens": 5000},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert "max_new_tokens (5000)" in r.json()["error"]["message"], r.text
    later = sdk(gateway.url).completions.create(
        model=model_of(gateway.url), prompt="ok", max_tokens=2
    )
    assert later.choices[0].text == "ok"


def test_the_gateway_parses_tool_calls_and_reasoning(gateway):
    client, model = sdk(gateway.url), model_of(gateway.url)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": call}],
        tools=[TOOL],
        max_tokens=len(call),  # one byte token a character: the echo is the call, once
    ).choices[0]
    assert reply.message.content in (None, ""), reply
    fn = reply.message.tool_calls[0].function
    assert fn.name == "get_weather" and json.loads(fn.arguments) == {"city": "Paris"}
    thought = (
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "<think>sum it</think>4"}],
            max_tokens=40,
            extra_body={"separate_reasoning": True},
        )
        .choices[0]
        .message
    )
    assert thought.content.startswith("4"), thought  # the answer after </think>
    assert thought.model_extra["reasoning_content"] == "sum it", thought


# ------------------------------------------------------------------ load and membership
class Load:
    """Threads sending completions in a loop until stopped; every answer is recorded."""

    def __init__(self, url: str, threads: int = 6):
        self.client = sdk(url)
        self.model = model_of(url)
        self.ok = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            prompt = f"load {i} {n} " + "x" * 20
            try:
                text = (
                    self.client.completions.create(
                        model=self.model, prompt=prompt, max_tokens=24, temperature=0
                    )
                    .choices[0]
                    .text
                )
                assert text == prompt[:24], text
                with self.lock:
                    self.ok += 1
            except Exception as e:  # noqa: BLE001 -- recorded and asserted on
                with self.lock:
                    self.errors.append(repr(e))
            n += 1

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def listed(gateway) -> list[dict]:
    return requests.get(gateway.url + "/workers", timeout=30).json()["workers"]


def running_on(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        loads = pb_grpc.SglangSchedulerStub(ch).GetLoads(pb.GetLoadsRequest(), timeout=10)
    return loads.loads[0].num_running_reqs


def test_a_worker_joined_under_load_takes_traffic_and_leaves_losing_nothing(
    gateway, echo_model, tmp_path
):
    port = PortBook().take()
    url = f"grpc://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "plait.server.cli", "serve", "--grpc-mode", *FAKE,
        "--model-path", str(echo_model), "--port", str(port), "--join", gateway.url,
    ]  # fmt: skip
    log = tmp_path / "joined.log"
    with Load(gateway.url) as load:
        worker = subprocess.Popen(
            cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
            env={**os.environ, **DELAY},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while url not in [w["url"] for w in listed(gateway)]:
                assert worker.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
            busy = 0
            for _ in range(100):  # round robin: a third of the requests land here
                busy = max(busy, running_on(port))
                if busy:
                    break
                time.sleep(0.1)
            assert busy, "the joined worker never ran a request"
            before = load.ok
            worker.send_signal(signal.SIGTERM)  # leave the gateway, drain, exit
            assert worker.wait(120) == 0, log.read_text()
        finally:
            if worker.poll() is None:
                worker.kill()
        assert url not in [w["url"] for w in listed(gateway)]
        time.sleep(1.0)  # load keeps flowing to the others
    assert not load.errors, load.errors[:3]
    assert load.ok > before > 0
    assert "left the gateway" in log.read_text()


def test_kill_9_of_a_worker_with_requests_in_flight(gateway):
    """No request hangs: each ends, as a completion or as an error, within the bound; the
    requests after the kill succeed (the gateway retries and takes the dead worker out)."""
    workers = [
        p for p in child_pids(gateway.proc.pid)
        if b"plait.server.cli" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]  # fmt: skip
    assert len(workers) == 2
    client, model = sdk(gateway.url), model_of(gateway.url)

    def one(i: int) -> str:
        try:
            return (
                client.completions.create(
                    model=model, prompt=f"in flight {i} " + "y" * 40, max_tokens=48, temperature=0
                )
                .choices[0]
                .text
            )
        except openai.APIError as e:
            return f"error {type(e).__name__}"

    with ThreadPoolExecutor(16) as pool:
        started = time.monotonic()
        futures = [pool.submit(one, i) for i in range(16)]
        time.sleep(0.4)
        os.kill(workers[0], signal.SIGKILL)
        results = [f.result(timeout=120) for f in futures]
    assert time.monotonic() - started < 120
    assert wait_gone([workers[0]]) == []
    after = [one(100 + i) for i in range(8)]
    assert all(not a.startswith("error") for a in after), after
    print("in flight at the kill:", sum(r.startswith("error") for r in results), "errors of 16")


def wait_for_workers(server, count: int, timeout: float = 300) -> None:
    """The gateway's HTTP port answers before the launcher has seen every worker listed:
    wait for the pool itself."""
    import time

    deadline = time.monotonic() + timeout
    while len(listed_healthy(server.url)) < count:
        assert server.proc.poll() is None, server.log.read_text()[-3000:]
        assert time.monotonic() < deadline, server.log.read_text()[-3000:]
        time.sleep(0.5)
