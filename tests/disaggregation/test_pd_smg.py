"""``plait serve --pd 1P1D --gateway smg``: SGLang Model Gateway 1.x (``plait[gateway]``) in PD
mode in front of a real prefill and decode server (SmolLM2, Mooncake over TCP), driven by the
unmodified ``openai`` SDK. ``test_pd_gateway.py`` covers the same servers behind
sglang-router 0.3.2 (``--gateway sglang-router``) in depth; this module checks that smg pairs them
too and that what it returns equals a unified engine's output.
"""

from __future__ import annotations

import openai
import pytest
import requests

import plait
from plait.core.messages import GenerateReq
from tests.disaggregation.test_pd_gateway import logprob_rows
from tests.server.conftest import start_server

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Name a primary color."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smg_pd(smollm_dir, tmp_path_factory):
    server = start_server(
        ["--device", "cpu", "--pd", "1P1D", "--gateway", "smg", "--max-total-tokens", "8192"],
        tmp_path_factory.mktemp("pd-smg") / "pd.log",
        str(smollm_dir),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def unified(smollm_dir):
    engine = plait.Engine(model_path=smollm_dir, device="cpu")
    yield engine
    engine.shutdown()


def chat_ids(engine, messages: list[dict]) -> list[int]:
    tok = engine.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def test_openai_sdk_through_smg_equals_unified(smg_pd, unified):
    client = openai.OpenAI(base_url=smg_pd.url + "/v1", api_key="x")
    want = unified.generate(
        input_ids=chat_ids(unified, MESSAGES),
        sampling_params={"temperature": 0, "max_new_tokens": 16},
    )["text"]
    model = client.models.list().data[0].id
    kw = dict(model=model, messages=MESSAGES, temperature=0, max_tokens=16)
    assert client.chat.completions.create(**kw).choices[0].message.content == want
    stream = client.chat.completions.create(**kw, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want

    want = unified.generate(PROMPT, {"temperature": 0, "max_new_tokens": 12})["text"]
    done = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=12)
    assert done.choices[0].text == want


def test_generate_logprobs_and_n_through_smg_equal_unified(smg_pd, unified):
    """smg puts the prefill half's input_token_logprobs before the decode half's: the decode
    half returns them all, the prefill half none, so the client sees each once."""
    sp = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    lp = {"return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2}
    want = unified.generate_request([GenerateReq(text=PROMPT, sampling_params=dict(sp), **lp)])
    r = requests.post(
        smg_pd.url + "/generate", timeout=300, json={"text": PROMPT, "sampling_params": sp, **lp}
    )
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["output_ids"] == want[0]["output_ids"]
    g, w = logprob_rows(got["meta_info"]), logprob_rows(want[0]["meta_info"])
    assert [x[:4] for x in g] == [x[:4] for x in w]
    assert [x[4] for x in g] == pytest.approx([x[4] for x in w], abs=1e-3)

    r = requests.post(
        smg_pd.url + "/generate",
        timeout=300,
        json={"text": PROMPT, "sampling_params": {**sp, "n": 2}},
    )
    assert r.status_code == 200, r.text
    assert [o["output_ids"] for o in r.json()] == [want[0]["output_ids"]] * 2
