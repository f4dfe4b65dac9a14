"""smg in gRPC mode in front of two Plait gRPC workers running the real SmolLM2: the gateway
tokenizes and renders the chat template itself, and greedy answers still equal a single HTTP
worker's, token for token, through the unmodified ``openai`` SDK and ``/generate``."""

from __future__ import annotations

import openai
import pytest
import requests

from plait.server.children import PortBook
from plait.server.gateway import listed_healthy
from tests.server.conftest import start_server
from tests.server.test_server_real import MODEL

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def grpc_gateway(real_model_path, tmp_path_factory):
    book = PortBook()
    port, metrics = book.take(), book.take()
    server = start_server(
        ["--device", "cpu", "--dp", "2", "--grpc-mode", "--router-prometheus-port", str(metrics)],
        tmp_path_factory.mktemp("smg-real") / "gateway.log",
        real_model_path,
        port=port,
    )
    wait_for_workers(server, 2)
    wait_for_tokenizer(server)
    yield server
    assert server.stop() == 0


def gateway_model(grpc_gateway) -> str:
    """The id smg serves the model under (it routes by it in gRPC mode)."""
    r = requests.get(grpc_gateway.url + "/v1/models", timeout=60)
    return r.json()["data"][0]["id"]


def both(grpc_gateway, real_server):
    return [
        openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=300)
        for s in (grpc_gateway, real_server)
    ]


def test_greedy_chat_and_completions_equal_a_single_http_worker(grpc_gateway, real_server):
    for stream in (False, True):
        chats, comps = [], []
        names = (gateway_model(grpc_gateway), MODEL)
        for client, model in zip(both(grpc_gateway, real_server), names):
            chat = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Name a fruit."}],
                max_tokens=12,
                temperature=0,
                stream=stream,
            )
            comp = client.completions.create(
                model=model, prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=stream
            )
            if stream:
                chats.append("".join(c.choices[0].delta.content or "" for c in chat if c.choices))
                comps.append("".join(c.choices[0].text for c in comp if c.choices))
            else:
                chats.append(chat.choices[0].message.content)
                comps.append(comp.choices[0].text)
        assert chats[0] == chats[1] and chats[0], chats
        assert comps[0] == comps[1] and comps[0], comps


def test_generate_equals_a_single_http_worker(grpc_gateway, real_server):
    for prompt in PROMPTS:
        body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 12}}
        via = requests.post(
            grpc_gateway.url + "/generate",
            json={**body, "model": gateway_model(grpc_gateway)},
            timeout=300,
        )
        direct = requests.post(real_server.url + "/generate", json=body, timeout=300)
        assert via.status_code == 200, via.text
        assert via.json()[0]["output_ids"] == direct.json()["output_ids"]
        assert via.json()[0]["text"] == direct.json()["text"]


def wait_for_workers(server, count: int, timeout: float = 300) -> None:
    """The gateway's HTTP port answers before the launcher has seen every worker listed:
    wait for the pool itself."""
    import time

    deadline = time.monotonic() + timeout
    while len(listed_healthy(server.url)) < count:
        assert server.proc.poll() is None, server.log.read_text()[-3000:]
        assert time.monotonic() < deadline, server.log.read_text()[-3000:]
        time.sleep(0.5)


def wait_for_tokenizer(server, timeout: float = 300) -> None:
    """smg registers the workers' tokenizer after it lists them: until then a request is a
    503 "Tokenizer ... is not registered yet; retry shortly" (seen once in a CI run)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        r = requests.post(
            server.url + "/v1/completions",
            json={"model": gateway_model(server), "prompt": "Hi", "max_tokens": 1},
            timeout=300,
        )
        if not (r.status_code == 503 and "not registered" in r.text):
            assert r.status_code == 200, r.text
            return
        assert time.monotonic() < deadline, r.text
        time.sleep(0.5)
