"""``plait serve --tp 2``: chat works, /generate gives transformers' greedy tokens, and SIGTERM
stops the HTTP process, the scheduler process and the worker rank; /get_server_info reports
each rank's shard."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import hf_greedy
from tests.server.conftest import start_server

pytestmark = pytest.mark.slow


def test_serve_tp2_chat_generate_parity_and_clean_sigterm(real_model_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "The capital of France is"
    ids = AutoTokenizer.from_pretrained(real_model_path).encode(prompt)
    hf = AutoModelForCausalLM.from_pretrained(real_model_path, dtype=torch.float32).eval()
    want = hf_greedy(hf, [ids], 16)[0]

    server = start_server(["--device", "cpu", "--tp", "2"], tmp_path / "tp.log", real_model_path)
    try:
        tree = psutil.Process(server.proc.pid).children(recursive=True)
        assert any("plait.core.tp.worker" in " ".join(p.cmdline()) for p in tree)
        chat = server.post(
            "/v1/chat/completions",
            json={
                "model": Path(real_model_path).name,
                "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 8,
                "temperature": 0,
            },
        )
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
        out = server.post(
            "/generate",
            json={"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 16}},
        ).json()
        assert out["output_ids"] == want
        # each rank's own report of its shard: SmolLM2's 9/3 heads as 6/2 and 3/1
        ranks = server.get("/get_server_info").json()["tp_ranks"]
        assert [(r["rank"], r["attention_heads"], r["kv_heads"]) for r in ranks] == [
            (0, 6, 2),
            (1, 3, 1),
        ]
    finally:
        assert server.stop() == 0
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"left running: {alive}"
