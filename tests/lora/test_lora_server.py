"""``plait serve --lora-paths`` end to end: a real server process on the tiny model, the openai
SDK naming the adapter as ``model`` (and SGLang's ``base:adapter``, ``default:adapter``; the
OpenAPI schema's ``model`` enum follows the loaded adapters), ``lora_path`` on
/generate, /v1/models, /load_lora_adapter and /unload_lora_adapter; output equal to
transformers + peft."""

from __future__ import annotations

import pytest

from tests.lora.conftest import GREEDY, PROMPTS, lora_paths
from tests.server.conftest import start_server

pytestmark = pytest.mark.slow  # a server process and its engine: ~30 s on 2 cores


def test_serve_with_adapters(lora_setup, tmp_path):
    import openai

    base_dir, dirs, expected = lora_setup
    first = {k: v for k, v in dirs.items() if k != "mlp6"}
    server = start_server(
        ["--device", "cpu", "--lora-paths", *lora_paths(first), "--max-loras-per-batch", "2"],
        tmp_path / "serve.log",
        str(base_dir),
    )
    try:
        models = server.get("/v1/models").json()["data"]
        base = models[0]["id"]
        assert {m["id"] for m in models} == {base, "qv4", "all8"}
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        pairs = (("qv4", "qv4"), (f"{base}:all8", "all8"), ("default:qv4", "qv4"), (base, None))
        for model, name in pairs:
            out = client.completions.create(
                model=model, prompt=PROMPTS[2], max_tokens=GREEDY["max_new_tokens"], temperature=0
            )
            gen = server.post(
                "/generate",
                json={"input_ids": PROMPTS[2], "sampling_params": GREEDY, "lora_path": name},
            ).json()
            assert gen["output_ids"] == expected[name][2]
            assert out.choices[0].text == gen["text"]  # the SDK's model chose that adapter
        r = server.post("/generate", json={"input_ids": PROMPTS[0], "lora_path": "nope"})
        assert r.status_code == 400 and "nope" in r.text
        with pytest.raises(openai.BadRequestError, match="nope"):
            client.completions.create(model="nope", prompt="hi", max_tokens=2)
        r = server.post(
            "/load_lora_adapter", json={"lora_name": "mlp6", "lora_path": str(dirs["mlp6"])}
        )
        assert r.status_code == 200, r.text
        assert {"mlp6", "default:mlp6", f"{base}:qv4"} <= set(_schema_models(server))
        batch = server.post(
            "/generate",
            json={
                "input_ids": PROMPTS,
                "sampling_params": GREEDY,
                "lora_path": ["mlp6", None, "qv4", "mlp6"],
            },
        ).json()
        names = ["mlp6", None, "qv4", "mlp6"]
        assert [o["output_ids"] for o in batch] == [expected[n][i] for i, n in enumerate(names)]
        assert server.post("/unload_lora_adapter", json={"lora_name": "mlp6"}).status_code == 200
        assert "mlp6" not in _schema_models(server)  # the schema follows the loaded adapters
        r = server.post("/unload_lora_adapter", json={"lora_name": "mlp6"})
        assert r.status_code == 400 and "mlp6" in r.text
    finally:
        server.stop()


def _schema_models(server) -> list[str]:
    schema = server.get("/openapi.json").json()
    return schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]["enum"]
