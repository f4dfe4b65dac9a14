"""Mixtral, Qwen2-MoE and Qwen3-MoE: greedy outputs equal transformers' float32 generate token
for token on tiny random checkpoints (8 experts, top-2), batched with ragged prompts, after
prefix-cache hits and with chunked prefill; one decode step's tokens are seen routing to
different experts; tensor parallelism and ``gguf`` without its file are refused with the reason
(GGUF files themselves: ``tests/models/test_gguf_moe.py``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import plait
from plait.models.moe import SparseMoeBlock, softmax_topk
from plait.models.moe_models import MoeForCausalLM, is_sparse_layer
from tests.conftest import hf_greedy

NEW = 20
SHARED = list(range(300, 340))  # a cached prefix for the second round
PROMPTS = [
    SHARED + [7, 8, 9],
    list(range(1000, 1012)),
    [5, 17, 300, 4000, 41],
    SHARED + list(range(2000, 2019)),
    [9] * 3 + list(range(60, 90)),
]
GREEDY = {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}

#: architecture -> make_tiny_model arguments (8 experts, top-2; TINY_BASE's 64 hidden, 2 layers)
MOE_CONFIGS = {
    "mixtral": dict(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2),
    # layer 0 dense (decoder_sparse_step 2), layer 1 sparse with the shared expert; top-k weights
    # not renormalised (norm_topk_prob False), q/k/v bias
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        decoder_sparse_step=2,
        norm_topk_prob=False,
    ),
    # every layer sparse, renormalised top-k, Qwen3's q/k RMSNorm attention
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
    ),
}


def tiny_moe(make_tiny_model, arch: str):
    kw = dict(MOE_CONFIGS[arch])
    return make_tiny_model(kw.pop("model_type"), **kw)


def hf_expected(path, prompts=PROMPTS) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return hf_greedy(model, prompts, NEW)


@pytest.fixture(scope="module", params=sorted(MOE_CONFIGS))
def moe_case(request, make_tiny_model):
    path = tiny_moe(make_tiny_model, request.param)
    return request.param, path, hf_expected(path)


def generate_twice(engine: plait.Engine, prompts=PROMPTS) -> list[list[int]]:
    """One ragged batch, then the same prompts again, the shared prefix from the cache."""
    first = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    again = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert all(
        o["meta_info"]["cached_tokens"] >= len(SHARED)
        for o, p in zip(again, prompts)
        if p[: len(SHARED)] == SHARED
    )
    got = [o["output_ids"] for o in first]
    assert [o["output_ids"] for o in again] == got
    return got


@pytest.mark.parametrize(
    "engine_args", [{}, {"chunked_prefill_size": 16}], ids=["whole-prefill", "chunked16"]
)
def test_moe_greedy_matches_transformers(moe_case, engine_args):
    arch, path, want = moe_case
    with plait.Engine(path, max_total_tokens=2048, **engine_args) as engine:
        model = engine.scheduler.runner.model
        assert isinstance(model, MoeForCausalLM)
        sparse = [i for i in range(2) if is_sparse_layer(model.config, i)]
        assert sparse == ([1] if arch == "qwen2_moe" else [0, 1])
        assert all(isinstance(model.layers[i].mlp, SparseMoeBlock) for i in sparse)
        assert generate_twice(engine) == want


def test_one_decode_step_routes_tokens_to_different_experts(make_tiny_model):
    """Record the router's choices during decode: in one step of five requests the tokens
    pick different experts (so the grouped product really splits the batch), and the
    output is still transformers'."""
    path = tiny_moe(make_tiny_model, "mixtral")
    want = hf_expected(path)
    steps: list[torch.Tensor] = []
    with plait.Engine(path, max_total_tokens=2048) as engine:
        model = engine.scheduler.runner.model
        block = model.layers[1].mlp

        def record(module, args, logits):
            if logits.shape[0] == len(PROMPTS):  # a decode step of every request
                steps.append(softmax_topk(logits, block.top_k, block.renormalize)[1])

        handle = block.gate.register_forward_hook(record)
        got = [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]
        handle.remove()
    assert got == want
    assert steps, "no decode step with every request was seen"
    for ids in steps:
        assert len(set(ids[:, 0].tolist())) >= 2  # first choices differ between tokens
        assert len(set(ids.flatten().tolist())) > block.top_k  # more experts than one token's
    assert len(set(torch.cat(steps).flatten().tolist())) >= 6  # most experts see work


def test_tensor_parallel_is_refused_naming_the_experts(make_tiny_model):
    path = tiny_moe(make_tiny_model, "mixtral")
    with pytest.raises(Exception, match="experts are not sharded"):
        plait.Engine(path, max_total_tokens=512, tp_size=2)


def test_gguf_without_its_file_and_captured_quantized_experts_are_refused(make_tiny_model):
    from plait.core.backend_api import ModelSpec
    from plait.models.loader import load_config
    from plait.models.moe_loader import load_moe
    from plait.quant import QuantConfig
    from plait.quant.modules import torch_quantized_matmul

    path = tiny_moe(make_tiny_model, "mixtral")
    spec = ModelSpec(
        model_dir=path,
        hf_config=load_config(path),
        dtype=torch.float32,
        context_len=64,
        max_batch_size=1,
        quantization=QuantConfig(method="gguf"),
    )
    with pytest.raises(ValueError, match="quantization='gguf' needs the .gguf file"):
        load_moe(spec, torch.device("cpu"), torch_quantized_matmul)
    int8 = dataclasses.replace(spec, quantization=QuantConfig(method="int8"), graph_capture=True)
    with pytest.raises(ValueError, match="--disable-graph-capture"):
        load_moe(int8, torch.device("cuda"), torch_quantized_matmul)


def test_sparse_layers_follow_decoder_sparse_step_and_mlp_only_layers():
    from transformers import AutoConfig

    def sparse(**kw):
        config = AutoConfig.for_model("qwen2_moe", num_hidden_layers=6, num_experts=4, **kw)
        return [i for i in range(6) if is_sparse_layer(config, i)]

    assert sparse() == [0, 1, 2, 3, 4, 5]
    assert sparse(decoder_sparse_step=2) == [1, 3, 5]
    assert sparse(decoder_sparse_step=2, mlp_only_layers=[3]) == [1, 5]
    assert sparse(mlp_only_layers=[0, 4]) == [1, 2, 3, 5]


def test_int8_quantized_experts_in_the_engine(make_tiny_model):
    """``quantization="int8"``: every sparse layer's experts (and the attention/dense Linears)
    run quantized through the backend's matmul, the routers stay float; prompt logprobs stay
    within int8's error of the float model's."""
    from plait.models.moe_quant import QuantizedMoEExperts
    from plait.quant.modules import QuantizedLinear

    path = tiny_moe(make_tiny_model, "qwen2_moe")
    ask = dict(return_logprob=True, logprob_start_len=0, sampling_params={"max_new_tokens": 1})
    logprobs = {}
    for method in ("none", "int8"):
        with plait.Engine(path, max_total_tokens=2048, quantization=method) as engine:
            block = engine.scheduler.runner.model.layers[1].mlp
            if method == "int8":
                assert isinstance(block.experts, QuantizedMoEExperts)
                assert isinstance(block.shared_expert.gate_up_proj, QuantizedLinear)
                assert not isinstance(block.gate, QuantizedLinear)
            out = engine.generate(input_ids=PROMPTS[1], **ask)
            logprobs[method] = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]]
    diffs = [abs(a - b) for a, b in zip(logprobs["none"], logprobs["int8"])]
    assert max(diffs) < 0.05 and sum(diffs) > 0  # close, and really quantized
