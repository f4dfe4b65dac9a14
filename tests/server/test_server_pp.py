"""``plait serve --pp 2``: /generate gives transformers' greedy tokens on SmolLM2 (30 layers,
tied embeddings: the last rank loads its LM head from the embedding), chat works,
/get_server_info reports each rank's layers, and SIGTERM stops every process."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import hf_greedy
from tests.server.conftest import start_server

pytestmark = pytest.mark.slow


def test_serve_pp2_generate_parity_chat_layers_and_clean_sigterm(real_model_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["The capital of France is", "def fibonacci(n):"]
    tok = AutoTokenizer.from_pretrained(real_model_path)
    hf = AutoModelForCausalLM.from_pretrained(real_model_path, dtype=torch.float32).eval()
    want = hf_greedy(hf, [tok.encode(p) for p in prompts], 16)

    server = start_server(["--device", "cpu", "--pp", "2"], tmp_path / "pp.log", real_model_path)
    try:
        tree = psutil.Process(server.proc.pid).children(recursive=True)
        workers = [p for p in tree if "plait.core.tp.worker" in " ".join(p.cmdline())]
        assert len(workers) == 1 and '"pp_size": 2' in " ".join(workers[0].cmdline())
        out = server.post(
            "/generate",
            json={"text": prompts, "sampling_params": {"temperature": 0, "max_new_tokens": 16}},
        ).json()
        assert [o["output_ids"] for o in out] == want
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
        ranks = server.get("/get_server_info").json()["pp_ranks"]
        assert [(r["rank"], r["layers"], r["kv_layers"]) for r in ranks] == [
            (0, [0, 15], 15),
            (1, [15, 30], 15),
        ]
        assert [(r["embedding"], r["lm_head"]) for r in ranks] == [(True, False), (False, True)]
    finally:
        assert server.stop() == 0
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"left running: {alive}"
