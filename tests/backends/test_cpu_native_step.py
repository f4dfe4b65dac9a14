"""The CPU backend's native decode and extend steps (csrc/src/layer_step.cpp through
plait.backends.cpu.native_step) compute what the eager torch step computes: the same greedy tokens and logprobs within float
rounding, for Llama, Qwen2 (q/k/v bias) and Mistral, float32 and quantized weights, batched
with ragged lengths and prefix-cache hits. It is the default decode path on the CPU, and is
not used where it cannot compute the model exactly. The real-model parity with transformers
is tests/core/test_engine_parity.py, which runs through it."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import plait
from plait.backends.cpu.linear import panel_extension
from plait.backends.cpu.native_step import NativeDecode, NativeExtend
from plait.backends.cpu.plugin import CpuOptions

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="no C++ compiler on this machine to build the kernel",
)

PROMPTS = [[5, 6, 7], [100, 200, 300, 400, 500, 600, 700, 800, 900], [42] * 20, [5, 6, 7, 8]]
PARAMS = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


def decode_forward(engine: plait.Engine):
    return engine.scheduler.runner.model.decode_forward


def greedy_with_logprobs(engine: plait.Engine) -> tuple[list[list[int]], torch.Tensor]:
    outs = engine.generate(input_ids=PROMPTS, sampling_params=PARAMS, return_logprob=True)
    again = engine.generate(input_ids=PROMPTS[:2], sampling_params=PARAMS, return_logprob=True)
    outs = outs + again  # the second round decodes after prefix-cache hits
    tokens = [o["output_ids"] for o in outs]
    logprobs = torch.tensor([[e[0] for e in o["meta_info"]["output_token_logprobs"]] for o in outs])
    return tokens, logprobs


def run(path, native: bool, layout: str | None = None, **engine_args):
    options = CpuOptions(native_decode=native, linear_layout=layout)
    with plait.Engine(
        model_path=path, max_total_tokens=512, backend_options=options, **engine_args
    ) as engine:
        if layout is not None and engine_args.get("quantization", "none") == "none":
            assert engine.scheduler.runner.model.lm_head.layout == layout
        assert isinstance(decode_forward(engine), NativeDecode) == native
        assert isinstance(engine.scheduler.runner.model.extend_forward, NativeExtend) == native
        return greedy_with_logprobs(engine)


@pytest.mark.parametrize(
    "model_type,quantization,layout",
    [
        ("llama", "none", None),
        ("qwen2", "none", None),
        ("mistral", "none", None),
        ("llama", "none", "onednn"),
        ("qwen2", "none", "onednn"),
        ("llama", "int8", None),
        ("llama", "int4", None),
        ("qwen2", "int4", None),
    ],
)
def test_native_step_gives_the_eager_steps_tokens_and_logprobs(
    make_tiny_model, model_type, quantization, layout
):
    """Each packed float32 form (``layout`` None: panels where the AVX-512 kernel builds) and
    each quantized one; qwen2's q/k/v carry a bias."""
    path = make_tiny_model(model_type)
    native_tokens, native_logprobs = run(path, True, layout, quantization=quantization)
    eager_tokens, eager_logprobs = run(path, False, layout, quantization=quantization)
    assert native_tokens == eager_tokens
    torch.testing.assert_close(native_logprobs, eager_logprobs, rtol=0, atol=2e-4)


def test_native_step_is_not_used_where_it_cannot_compute_the_model(make_tiny_model):
    with plait.Engine(
        model_path=make_tiny_model("llama"), max_total_tokens=256, dtype="float16"
    ) as engine:
        assert decode_forward(engine) is None  # float16: the eager step
        assert engine.generate(input_ids=PROMPTS[0], sampling_params=PARAMS)["output_ids"]


def test_bad_positions_and_slots_are_errors_not_writes_out_of_bounds(make_tiny_model):
    from plait.backends.cpu.native_step import build_native_decode

    with plait.Engine(model_path=make_tiny_model("llama"), max_total_tokens=256) as engine:
        runner = engine.scheduler.runner
        step = engine._call(lambda: build_native_decode(runner.model, runner.attn)).step
        x = torch.zeros(1, 64)
        one = torch.ones(1, dtype=torch.int64)
        slots = torch.ones(1, 1, dtype=torch.int64)
        with pytest.raises(RuntimeError, match="position out of range"):
            step.forward(x, torch.tensor([10**6]), one, slots, one)
        with pytest.raises(RuntimeError, match="KV slot out of range"):
            step.forward(x, one, torch.tensor([10**7]), slots, one)
        # the extend step checks the same before writing anything
        never = lambda q, layer: pytest.fail("attention reached with a bad row")  # noqa: E731
        with pytest.raises(RuntimeError, match="position out of range"):
            step.extend(x, torch.tensor([-1]), one, torch.zeros(1, dtype=torch.int64), never)
        with pytest.raises(RuntimeError, match="KV slot out of range"):
            step.extend(x, one, torch.tensor([-5]), torch.zeros(1, dtype=torch.int64), never)


SHARED = list(range(300, 300 + 150))  # a 150-token prefix: past the shared-attention threshold


def prompt_logprobs(engine: plait.Engine) -> tuple[list[list[int]], torch.Tensor]:
    """A prefill of two prompts (every prompt token's logprob asked for), then three that share
    the first one's 150 leading tokens (a cache hit each, one shared group in one extend
    batch)."""
    params = dict(PARAMS, max_new_tokens=4)
    first = engine.generate(
        input_ids=[SHARED + [7, 8, 9], list(range(1000, 1040))],
        sampling_params=params,
        return_logprob=True,
        logprob_start_len=0,
    )
    # logprobs from the first new token: the cached prefix then needs no logits of its own
    then = engine.generate(
        input_ids=[SHARED + [11] * n for n in (3, 9, 1)],
        sampling_params=params,
        return_logprob=True,
        logprob_start_len=len(SHARED),
    )
    outs = first + then
    tokens = [o["output_ids"] for o in outs]
    logprobs = torch.tensor(
        [e[0] for o in outs for e in o["meta_info"]["input_token_logprobs"] if e[0] is not None]
    )
    return tokens, logprobs


@pytest.mark.parametrize("chunked_prefill_size", [None, 64])
def test_native_extend_gives_the_eager_prompt_logprobs(
    make_tiny_model, monkeypatch, chunked_prefill_size
):
    from plait.backends.cpu import paged_decode

    path = make_tiny_model("llama")
    results, groups = {}, []

    def recording(*args):
        found = shared_groups(*args)
        groups.extend(found)
        return found

    shared_groups = paged_decode.shared_groups
    for native in (True, False):
        with monkeypatch.context() as m:
            m.setattr(paged_decode, "shared_groups", recording)
            with plait.Engine(
                model_path=path,
                max_total_tokens=2048,
                chunked_prefill_size=chunked_prefill_size,
                backend_options=CpuOptions(native_decode=native),
            ) as engine:
                model = engine.scheduler.runner.model
                assert isinstance(model.extend_forward, NativeExtend) == native
                results[native] = prompt_logprobs(engine)
    # both runs' third batch attended to the 150 shared tokens once (the cascade ran)
    # (149: the logits of the prefix's last token give the first asked-for logprob)
    assert [(g.count, g.length) for g in groups] == [(3, 149), (3, 149)]
    assert results[True][0] == results[False][0]
    assert len(results[True][1]) > 190
    torch.testing.assert_close(results[True][1], results[False][1], rtol=0, atol=2e-4)


def snap_to_4_bit_grid(w: torch.Tensor) -> torch.Tensor:
    """``w`` as a GGUF Q4_1 round trip leaves it: per 32-input block, q * d + m."""
    blocks = w.reshape(w.shape[0], -1, 32)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    d = ((hi - lo) / 15).half().float()
    m = lo.half().float()
    q = ((blocks - m) / d).round().clamp(0, 15)
    return (q * d + m).reshape(w.shape)


@pytest.mark.skipif(panel_extension() is None, reason="needs the AVX-512 panel kernel")
@pytest.mark.parametrize(
    "snap,form", [(snap_to_4_bit_grid, "affine4"), (lambda w: w.bfloat16().float(), "bf16")]
)
def test_a_checkpoint_with_a_smaller_form_decodes_compact_to_the_same_bits(
    make_tiny_model, tmp_path, snap, form
):
    """A float32 checkpoint converted from Q4_1 (as the default SmolLM2 here is), or upcast
    from bfloat16: every Linear keeps its smaller form (a 16-bit one instead of its float32
    panels, except the LM head's), and decode's tokens and logprobs are those of the float32
    panels, bit for bit (the real model's parity with transformers, through the 4-bit form, is
    tests/core/test_engine_parity.py)."""
    from safetensors.torch import load_file, save_file

    src = make_tiny_model("llama")
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = load_file(src / "model.safetensors")
    save_file(
        {k: snap(v) if v.dim() == 2 else v for k, v in weights.items()},
        tmp_path / "model.safetensors",
    )
    results = {}
    for compact in (True, False):
        with plait.Engine(
            model_path=tmp_path,
            max_total_tokens=512,
            backend_options=CpuOptions(compact_weights=compact),
        ) as engine:
            model = engine.scheduler.runner.model
            layer = model.layers[0]
            linears = [
                layer.self_attn.qkv_proj,
                layer.self_attn.o_proj,
                layer.mlp.gate_up_proj,
                layer.mlp.down_proj,
                model.lm_head,
            ]
            assert [lin.compact_format for lin in linears] == [form if compact else None] * 5
            # 16-bit weights drop their float32 panels, except the LM head's (greedy head)
            dropped = compact and form == "bf16"
            assert [lin.has_panels for lin in linears] == [not dropped] * 4 + [True]
            assert isinstance(decode_forward(engine), NativeDecode)
            results[compact] = greedy_with_logprobs(engine)
    assert results[True][0] == results[False][0]
    assert torch.equal(results[True][1], results[False][1])
