"""``plait serve --pd 1P1D --tp 2``: a prefill server and a decode server of two
tensor-parallel ranks each (four engine processes, each rank's KV shard in its own process),
KV moved rank to rank by Mooncake over TCP, requests through the gateway. A tiny random Llama
(2 KV heads: one per rank) keeps four processes cheap; one launch serves every check here.
The reference is a unified ``plait.Engine`` in this process.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import zmq

import plait
from tests.server.conftest import start_server
from tests.server.test_data_parallel import child_pids

pytestmark = pytest.mark.slow

PROMPTS = [
    "Hi",
    "The capital of France is",
    "Once upon a time, in a quiet village by the sea, " * 8,
]
GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return make_tiny_model()


@pytest.fixture(scope="module")
def pd(model, tmp_path_factory):
    server = start_server(
        ["--device", "cpu", "--pd", "1P1D", "--tp", "2", "--max-total-tokens", "4096"],
        tmp_path_factory.mktemp("pd-tp") / "pd.log",
        str(model),
    )
    try:
        server.children = {}
        for pid in child_pids(server.proc.pid):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode().split("\0")
            if "--disaggregation-mode" in cmd:
                mode = cmd[cmd.index("--disaggregation-mode") + 1]
                port = cmd[cmd.index("--port") + 1]
                flag = "--disaggregation-bootstrap-port"  # the prefill server's
                boot = int(cmd[cmd.index(flag) + 1]) if flag in cmd else None
                server.children[mode] = (f"http://127.0.0.1:{port}", boot)
        assert set(server.children) == {"prefill", "decode"}
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def unified(model):
    engine = plait.Engine(model_path=model, device="cpu", max_total_tokens=4096)
    yield engine
    engine.shutdown()


def post(url: str, text: str, **extra) -> requests.Response:
    return requests.post(
        url + "/generate", timeout=300, json={"text": text, "sampling_params": GREEDY, **extra}
    )


def generate(url: str, text: str) -> dict:
    r = post(url, text)
    assert r.status_code == 200, r.text
    return r.json()


def info(url: str) -> dict:
    return requests.get(url + "/get_server_info", timeout=30).json()


def test_greedy_through_tp2_pair_equals_unified_and_every_shard_moves(pd, unified):
    """Both servers run two ranks; the decode server computes no prompt token, and the bytes
    it received are every layer's K and V of *all* KV heads (both ranks' shards) per token,
    plus the first token: rank 1's shard went from prefill rank 1 to decode rank 1."""
    want = [o["output_ids"] for o in unified.generate(PROMPTS, dict(GREEDY))]
    decode_url = pd.children["decode"][0]
    before = info(decode_url)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # one batch on both servers
        got = list(pool.map(lambda p: generate(pd.url, p), PROMPTS))
    assert [o["output_ids"] for o in got] == want
    after = info(decode_url)
    for url, _ in pd.children.values():
        assert [r["kv_heads"] for r in info(url)["tp_ranks"]] == [1, 1]
    assert after["prefill_tokens"] == 0
    transfers = after["kv_transfers"] - before["kv_transfers"]
    tokens = after["kv_tokens_received"] - before["kv_tokens_received"]
    assert transfers == len(PROMPTS)
    k = unified.scheduler.runner.kv_pool.k_buffers[0]  # one rank: a slot holds every KV head
    per_token = 2 * unified.hf_config.num_hidden_layers * k[0].numel() * k.element_size()
    nbytes = after["kv_bytes_received"] - before["kv_bytes_received"]
    assert nbytes == tokens * per_token + 8 * transfers


def test_decode_radix_cache_reused_across_ranks(pd, unified):
    """A repeated prefix: the decode server receives only the new tokens' KV on every rank,
    and the output stays the unified engine's."""
    base = "A preamble the decode server has cached on both of its ranks. " * 5
    prompts = [base + "First?", base + "Second?"]
    want = [o["output_ids"] for o in unified.generate(prompts, dict(GREEDY))]
    decode_url = pd.children["decode"][0]
    counts = []
    got = []
    for prompt in prompts:
        before = info(decode_url)
        got.append(generate(pd.url, prompt)["output_ids"])
        after = info(decode_url)
        counts.append(
            {
                k: after[k] - before[k]
                for k in ("kv_tokens_received", "kv_tokens_reused", "kv_bytes_received")
            }
        )
    assert got == want
    assert counts[0]["kv_tokens_reused"] == 0
    assert counts[1]["kv_tokens_reused"] > 50
    assert counts[1]["kv_tokens_received"] < counts[0]["kv_tokens_received"] / 4
    assert counts[1]["kv_bytes_received"] < counts[0]["kv_bytes_received"] / 4


def test_a_decode_server_of_another_tp_is_refused_by_name(pd, unified):
    """A decode side whose target lists no rank table (``--tp 1``) gets ``failed`` naming
    both sizes, and the prefill half ends with that error instead of writing half the KV."""
    prefill_url, boot = pd.children["prefill"]
    ctx = zmq.Context()
    notify = ctx.socket(zmq.PULL)
    notify.setsockopt(zmq.LINGER, 0)
    notify_port = notify.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(f"tcp://127.0.0.1:{boot}")
    room = 987654321
    n = len(unified.tokenizer.encode(PROMPTS[1]))
    push.send(
        json.dumps(
            {
                "op": "target",
                "room": room,
                "session": "127.0.0.1:1",
                "notify": f"tcp://127.0.0.1:{notify_port}",
                "layout": {"bases": [0], "slot_bytes": 1},
                "ranks": [],
                "cached": 0,
                "slots": list(range(n)),
                "aux": 0,
            }
        ).encode()
    )
    r = post(
        prefill_url,
        PROMPTS[1],
        bootstrap_host="127.0.0.1",
        bootstrap_port=boot,
        bootstrap_room=room,
    )
    assert "needs the same --tp on both sides" in r.text, r.text
    assert notify.poll(10_000)
    msg = json.loads(notify.recv())
    assert msg["op"] == "failed" and "runs 1 tensor-parallel ranks" in msg["message"]
    assert "prefill server 2" in msg["message"]
    push.close()
    notify.close()
    ctx.term()
