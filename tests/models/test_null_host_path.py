"""The host path's fast lane (issue 41), driven through the null model: a request that neither
streams nor stops on strings is detokenized once, when it finishes, and still gets the text
and finish reason the general path gives; requests compare by identity, so the scheduler's
list bookkeeping never walks their fields."""

from __future__ import annotations

from typing import Any

import pytest

import plait
from plait.core.request import Req
from plait.core.sampling_params import SamplingParams
from plait.models.default import default_model_path
from plait.models.null import make_null_checkpoint, next_token

VOCAB = 49152  # SmolLM2's tokenizer


class _CountingTokenizer:
    """The engine's tokenizer, counting ``decode`` calls."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.decodes = 0

    def decode(self, *args: Any, **kwargs: Any) -> str:
        self.decodes += 1
        return self.inner.decode(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def null_engine(tmp_path_factory):
    path = make_null_checkpoint(tmp_path_factory.mktemp("null"), default_model_path())
    engine = plait.Engine(str(path), max_total_tokens=4096, max_running_requests=8)
    yield engine
    engine.shutdown()


def _chain(token: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        token = next_token(token, VOCAB)
        out.append(token)
    return out


def test_a_plain_request_is_detokenized_once_with_the_general_paths_text(null_engine):
    finisher = null_engine.scheduler.finisher
    counting = _CountingTokenizer(finisher.tokenizer)
    prompts = [[500, 600, 700 + i] for i in range(4)]
    stop_at = _chain(prompts[1][-1], 5)[4]  # request 1 stops on its 5th token
    params = [
        {"max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True},
        {"max_new_tokens": 24, "temperature": 0.0, "stop_token_ids": [stop_at]},
        {"max_new_tokens": 9, "temperature": 0.0, "ignore_eos": True},
        {
            "max_new_tokens": 24,
            "temperature": 0.0,
            "stop_token_ids": [stop_at],
            "no_stop_trim": True,
        },
    ]
    finisher.tokenizer = counting
    try:
        outs = null_engine.generate(input_ids=prompts, sampling_params=params)
    finally:
        finisher.tokenizer = counting.inner
    assert counting.decodes == len(prompts)  # one decode each, at the end: none per step
    lengths = [24, 5, 9, 24]
    for prompt, out, n in zip(prompts, outs, lengths):
        assert out["output_ids"] == _chain(prompt[-1], n)
    assert outs[0]["meta_info"]["finish_reason"] == {"type": "length", "length": 24}
    assert outs[1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_at}
    assert outs[2]["meta_info"]["finish_reason"] == {"type": "length", "length": 9}
    # the same requests streamed take the general (incremental) path: same text
    streamed = null_engine.generate(input_ids=prompts, sampling_params=params, stream=True)
    final = {}
    for chunk in streamed:
        if chunk["meta_info"]["finish_reason"] is not None:
            final[chunk["meta_info"]["id"]] = chunk
    texts = {tuple(c["output_ids"]): c["text"] for c in final.values()}
    assert len(texts) == len(outs)
    for out in outs:
        assert texts[tuple(out["output_ids"])] == out["text"]
    tok = counting.inner
    assert outs[1]["text"] == tok.decode(outs[1]["output_ids"][:-1], skip_special_tokens=True)
    assert outs[0]["text"] == tok.decode(outs[0]["output_ids"], skip_special_tokens=True)


def test_requests_compare_by_identity():
    a = Req(rid="r", input_ids=[1, 2], sampling=SamplingParams(), created=0.0)
    b = Req(rid="r", input_ids=[1, 2], sampling=SamplingParams(), created=0.0)
    assert a == a and a != b
    assert b not in [a]


def test_a_decode_step_builds_no_tensor_from_a_python_list(null_engine, monkeypatch):
    """Batch building and the placeholders' store convert host lists without
    ``torch.tensor(list)`` (~20 us each at batch 256; issue 41): generating more tokens adds
    no such call, however many decode steps it takes."""
    import torch

    calls = [0]
    real = torch.tensor

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        return real(*args, **kwargs)

    prompts = [[900 + i, 901, 902] for i in range(8)]

    def tensors_for(new_tokens: int) -> int:
        null_engine.flush_cache()
        params = {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
        calls[0] = 0
        monkeypatch.setattr(torch, "tensor", counting)
        try:
            outs = null_engine.generate(input_ids=prompts, sampling_params=[params] * 8)
        finally:
            monkeypatch.setattr(torch, "tensor", real)
        assert all(len(o["output_ids"]) == new_tokens for o in outs)
        return calls[0]

    assert tensors_for(20) == tensors_for(4)


def test_a_step_finishing_many_requests_emits_after_every_release(null_engine, monkeypatch):
    """Requests that finish in the same step are taken out of ``running`` in one pass (no
    ``ReqTable.remove`` scan per request) and their outputs emitted only after every one's KV
    is given back (its row freed): an emit wakes the caller, which took the GIL back at each
    torch call of the next release (issue 41)."""
    sched = null_engine.scheduler
    events: list[str] = []
    rows, real_emit = sched.kv.req_pool, sched.finisher.emit
    real_free, real_remove = rows.free, sched.table.remove
    removes = [0]

    def free(idx: int) -> None:
        events.append("free")
        real_free(idx)

    def emit(req: Req) -> None:
        events.append("emit")
        real_emit(req)

    def remove(req: Req) -> None:
        removes[0] += 1
        real_remove(req)

    null_engine.flush_cache()
    monkeypatch.setattr(rows, "free", free)
    monkeypatch.setattr(sched.finisher, "emit", emit)
    monkeypatch.setattr(sched.table, "remove", remove)
    prompts = [[300 + i, 301, 302] for i in range(8)]
    params = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    outs = null_engine.generate(input_ids=prompts, sampling_params=[params] * 8)
    assert [o["output_ids"] for o in outs] == [_chain(p[-1], 6) for p in prompts]
    assert events == ["free"] * 8 + ["emit"] * 8
    assert removes[0] == 0
    assert not sched.running


def test_a_decode_step_builds_no_adapter_set_without_lora(null_engine, monkeypatch):
    """Admission works out the running requests' LoRA adapters only when a request on one
    is checked: a step with no LoRA request (every decode step here) no longer walks
    ``running`` for them (issue 41)."""
    from plait.core import prefill

    built = [0]
    real = prefill.PrefillAdder.schedule

    def schedule(self: Any) -> Any:
        items = real(self)
        state = self.__dict__
        built[0] += state.get("adapters") is not None or state.get("_adapters") is not None
        return items

    monkeypatch.setattr(prefill.PrefillAdder, "schedule", schedule)
    params = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}
    outs = null_engine.generate(
        input_ids=[[400 + i, 401] for i in range(4)], sampling_params=[params] * 4
    )
    assert all(len(o["output_ids"]) == 12 for o in outs)
    assert built[0] == 0
