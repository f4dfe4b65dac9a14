"""Sliding-window attention (Mistral's ``sliding_window``, Qwen2's ``use_sliding_window``):
greedy outputs equal transformers' float32 generate token for token with prompts and
generations well past the window, through every CPU attention path, batched with ragged
lengths, with chunked prefill and after prefix-cache hits; the same weights with the window
removed give other tokens, so none of this can pass with the window ignored. A backend that
cannot apply a window refuses the model at load."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import torch

import plait
from plait.backends.cpu.attention import TorchAttentionBackend
from plait.backends.cpu.native_step import NativeDecode
from plait.backends.cpu.paged_decode import PagedDecodeAttentionBackend
from plait.backends.cpu.plugin import CpuOptions
from plait.models.sliding_window import layer_windows
from tests.conftest import hf_greedy

WINDOW = 8
NEW = 24
SHARED = list(range(300, 330))  # a cached prefix longer than the window
PROMPTS = [
    SHARED + [7, 8, 9],
    list(range(1000, 1012)),
    [5, 17, 300, 4000, 41],
    SHARED + list(range(2000, 2019)),
    [9] * 3 + list(range(60, 100)),
]
GREEDY = {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}
needs_cxx = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="no C++ compiler on this machine to build the kernels",
)


def windowed_mistral(make_tiny_model):
    return make_tiny_model("mistral", sliding_window=WINDOW)


def hf_expected(path, prompts=PROMPTS, **config_overrides) -> list[list[int]]:
    """transformers' float32 greedy tokens (the oracle), ignoring EOS as the engine does."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, **config_overrides
    ).eval()
    model.generation_config.eos_token_id = None
    return hf_greedy(model, prompts, NEW)


@pytest.fixture(scope="module")
def mistral(make_tiny_model):
    return windowed_mistral(make_tiny_model)


def expected_past_the_window(path, prompts=PROMPTS) -> list[list[int]]:
    """transformers' tokens for ``prompts`` on the windowed Mistral at ``path``, after
    checking that the window decides every prompt's tokens (an engine ignoring it cannot
    match)."""
    want = hf_expected(path, prompts)
    full = hf_expected(path, prompts, sliding_window=None)
    assert all(w != f for w, f in zip(want, full))
    return want


@pytest.fixture(scope="module")
def mistral_expected(mistral):
    return expected_past_the_window(mistral)


def generate_twice(engine: plait.Engine, prompts=PROMPTS) -> list[list[int]]:
    """One ragged batch, then the same prompts again served from the prefix cache."""
    first = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    again = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert all(
        o["meta_info"]["cached_tokens"] > WINDOW
        for o, p in zip(again, prompts)
        if len(p) > 2 * WINDOW
    )
    got = [o["output_ids"] for o in first]
    assert [o["output_ids"] for o in again] == got
    return got


# (CpuOptions switches, the attention class and decode step they must give)
CPU_PATHS = {
    "native": ({}, PagedDecodeAttentionBackend, NativeDecode),
    "paged-kernel-eager": ({"native_decode": False}, PagedDecodeAttentionBackend, None),
    "torch-reference": (
        {"native_decode": False, "paged_decode_kernel": False},
        TorchAttentionBackend,
        None,
    ),
}


@needs_cxx
@pytest.mark.parametrize(
    "engine_args",
    [{}, {"chunked_prefill_size": 16}, {"disable_radix_cache": True}],
    ids=["whole-prefill", "chunked16", "no-radix-cache"],
)
@pytest.mark.parametrize("cpu_path", list(CPU_PATHS))
def test_mistral_window_matches_transformers_on_every_cpu_path(
    mistral, mistral_expected, cpu_path, engine_args
):
    switches, attn_cls, decode_cls = CPU_PATHS[cpu_path]
    with plait.Engine(
        mistral, max_total_tokens=2048, backend_options=CpuOptions(**switches), **engine_args
    ) as engine:
        runner = engine.scheduler.runner
        assert type(runner.attn) is attn_cls
        assert runner.attn.sliding_windows == (WINDOW, WINDOW)
        decode = runner.model.decode_forward
        assert (decode is None) if decode_cls is None else isinstance(decode, decode_cls)
        if engine_args.get("disable_radix_cache"):
            got = [
                o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
            ]
        else:
            got = generate_twice(engine)
    assert got == mistral_expected


@needs_cxx
@pytest.mark.slow
def test_mistral_window_matches_transformers_with_compiled_decode(mistral, mistral_expected):
    with plait.Engine(
        mistral, max_total_tokens=2048, enable_graph_capture=True, chunked_prefill_size=16
    ) as engine:
        assert engine.scheduler.runner.graph_runner is not None
        assert generate_twice(engine) == mistral_expected


@needs_cxx
def test_qwen2_windows_only_its_upper_layers(make_tiny_model):
    """``max_window_layers=1``: layer 0 attends fully, layer 1 through the window. Prompts
    share a 140-token prefix, so layer 0 takes the shared-prefix cascade on cache hits; the
    native decode step, which passes one slot table to every layer, stands aside."""
    path = make_tiny_model(
        "qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    )
    shared = list(range(500, 640))
    prompts = [shared + [11, 12, 13], shared + list(range(700, 720)), list(range(40, 75))]
    want = hf_expected(path, prompts)
    assert want != hf_expected(path, prompts, layer_types=["full_attention"] * 2)
    with plait.Engine(path, max_total_tokens=2048, chunked_prefill_size=64) as engine:
        runner = engine.scheduler.runner
        assert runner.attn.sliding_windows == (None, WINDOW)
        assert runner.model.decode_forward is None
        assert generate_twice(engine, prompts) == want


def test_a_backend_that_cannot_apply_the_window_refuses_the_model(mistral, monkeypatch):
    monkeypatch.setattr(TorchAttentionBackend, "supports_sliding_window", False)
    with pytest.raises(
        ValueError,
        match=f"sliding_window={WINDOW} is not supported by the "
        "(Paged|Torch)\\w* attention backend",
    ):
        plait.Engine(mistral, max_total_tokens=2048)


def test_a_window_as_long_as_the_context_is_full_attention(make_tiny_model, monkeypatch):
    """Nothing to apply: even a backend without windows serves the model, as before."""
    monkeypatch.setattr(TorchAttentionBackend, "supports_sliding_window", False)
    path = make_tiny_model("mistral", sliding_window=64)
    with plait.Engine(path, max_total_tokens=512, context_length=64) as engine:
        assert engine.scheduler.runner.attn.sliding_windows == (None, None)


def config(model_type: str, n: int = 4, **fields) -> SimpleNamespace:
    return SimpleNamespace(model_type=model_type, num_hidden_layers=n, **fields)


@pytest.mark.parametrize(
    "cfg,windows",
    [
        (config("mistral", sliding_window=16), (16,) * 4),
        (config("mistral", sliding_window=None), (None,) * 4),
        (config("mistral", sliding_window=4096), (None,) * 4),  # >= the context (1024)
        (config("llama", sliding_window=16), (None,) * 4),
        (
            config("qwen2", use_sliding_window=False, sliding_window=16, max_window_layers=1),
            (None,) * 4,
        ),
        (
            config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2),
            (None, None, 16, 16),
        ),
        (
            config(
                "qwen2",
                use_sliding_window=True,
                sliding_window=16,
                layer_types=["sliding_attention", "full_attention"] * 2,
            ),
            (16, None, 16, None),
        ),
    ],
    ids=[
        "mistral",
        "mistral-none",
        "mistral-long",
        "llama",
        "qwen2-off",
        "qwen2-upper",
        "qwen2-layer-types",
    ],
)
def test_layer_windows_follow_transformers(cfg, windows):
    assert layer_windows(cfg, 1024) == windows


def test_a_window_below_one_is_refused():
    with pytest.raises(ValueError, match="sliding_window=0"):
        layer_windows(config("mistral", sliding_window=0), 1024)
