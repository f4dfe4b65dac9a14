"""``--dtype bfloat16`` on the CPU runs the native step (plait.backends.cpu.native_step): the
weights as 16-bit halves (no float32 panels), float32 activations and sums inside the step, and
a bfloat16 KV pool that the decode attention kernel widens as it reads it.

Its oracle is transformers in bfloat16 on the same weights. The two do not compute the same
bits (transformers rounds every activation to bf16, Plait keeps them in float32), so greedy
agreement is measured teacher-forced: transformers' argmax after each prefix Plait generated
must be Plait's next token for at least AGREEMENT of the tokens. The float32 parity tests are
unchanged (tests/core/test_engine_parity.py, tests/backends/test_cpu_native_step.py)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import plait
from plait.backends.cpu import cpp_build
from plait.backends.cpu.linear import panel_extension
from plait.backends.cpu.native_step import NativeDecode, NativeExtend

pytestmark = [
    pytest.mark.skipif(
        shutil.which(os.environ.get("CXX", "c++")) is None,
        reason="no C++ compiler on this machine to build the kernel",
    ),
    pytest.mark.skipif(panel_extension() is None, reason="needs the AVX-512 panel kernel"),
]

#: the least fraction of Plait's bf16 greedy tokens that transformers' bf16 argmax must equal
#: (measured 0.927 on this model: 89 of 96 tokens)
AGREEMENT = 0.85
PROMPTS = [[5, 6, 7], [100, 200, 300, 400, 500, 600, 700, 800, 900], [42] * 20, [5, 6, 7, 8]]
PARAMS = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
#: head_dim 64: the decode kernel's register path (the default tiny model's 16 takes the
#: generic one, which the kernel test below also covers)
HEAD64 = {"hidden_size": 256, "intermediate_size": 512}


def attention_case(seed: int, d: int, shared: int):
    """q [B, 6, d], bf16 K/V [S, 2, d], slots and lengths for 4 requests (the first
    ``shared`` slots common to all, then each its own)."""
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, s = 4, 6, 2, 1024
    q = torch.randn(b, hq, d, generator=g)
    k = torch.randn(s, hkv, d, generator=g).bfloat16()
    v = torch.randn(s, hkv, d, generator=g).bfloat16()
    lens = torch.tensor([shared + 40, shared + 7, shared + 65, shared + 1])
    perm = torch.randperm(s - 1, generator=g) + 1
    common, own = perm[:shared], perm[shared:]
    slots = torch.zeros(b, int(lens.max()), dtype=torch.int64)
    for i, n in enumerate(lens.tolist()):
        slots[i, :n] = torch.cat([common, own[i * 70 : i * 70 + n - shared]])
    return q, k, v, slots, lens


@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("shared", [0, 160])
def test_the_decode_kernel_reads_bf16_kv_as_its_float32_widening(d, shared):
    """Widening bf16 is exact, and the kernel does the same float32 arithmetic on it: the
    result equals the float32 kernel's on the widened pool bit for bit (per-request runs, the
    register path for 64 and 128, and the shared-prefix tiles)."""
    kernel = cpp_build.extension().decode_attention.decode_attention
    q, k, v, slots, lens = attention_case(d + shared, d, shared)
    got = kernel(q, k, v, slots, lens, d**-0.5)
    assert got.dtype == torch.float32
    assert torch.equal(got, kernel(q, k.float(), v.float(), slots, lens, d**-0.5))


def kv_bytes_per_token(engine: plait.Engine) -> int:
    pool = engine.scheduler.runner.attn.kv_pool
    return sum(b[0].numel() * b.element_size() for b in pool.k_buffers + pool.v_buffers)


def plait_bf16_greedy(path) -> list[list[int]]:
    """Greedy tokens of ``PROMPTS`` from a bf16 engine (batched, then the first two again
    after prefix-cache hits), checking it runs the native step on a bf16 KV pool and 16-bit
    weights."""
    with plait.Engine(model_path=path, max_total_tokens=512, dtype="bfloat16") as engine:
        runner = engine.scheduler.runner
        assert isinstance(runner.model.decode_forward, NativeDecode)
        assert isinstance(runner.model.extend_forward, NativeExtend)
        assert runner.attn.kv_pool.dtype == torch.bfloat16
        layer = runner.model.layers[0]
        for lin in (layer.self_attn.qkv_proj, layer.mlp.down_proj, runner.model.lm_head):
            assert lin.compact_format == "bf16" and lin.codes.dtype == torch.uint16
        assert not layer.mlp.gate_up_proj.has_panels  # no float32 copy of the weights
        bf16_bytes = kv_bytes_per_token(engine)
        outs = engine.generate(input_ids=PROMPTS, sampling_params=PARAMS)
        outs += engine.generate(input_ids=PROMPTS[:2], sampling_params=PARAMS)
    with plait.Engine(model_path=path, max_total_tokens=512) as engine:
        assert 2 * bf16_bytes == kv_bytes_per_token(engine)
    return [o["output_ids"] for o in outs]


def teacher_forced_agreement(model, prompts, outputs) -> float:
    """The fraction of ``outputs``' tokens that ``model``'s argmax gives after the prompt and
    the tokens before it (one forward per sequence)."""
    same = total = 0
    for prompt, out in zip(prompts, outputs):
        ids = torch.tensor([prompt + out])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1]
        same += int((logits.argmax(-1) == torch.tensor(out)).sum())
        total += len(out)
    return same / total


def test_bf16_greedy_agrees_with_transformers_in_bf16(make_tiny_model, capsys):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model("llama", **HEAD64)
    outputs = plait_bf16_greedy(path)
    prompts = PROMPTS + PROMPTS[:2]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    agreement = teacher_forced_agreement(hf, prompts, outputs)
    with capsys.disabled():
        print(f"\nbf16 greedy agreement with transformers bf16: {agreement:.3f}")
    assert agreement >= AGREEMENT
    # the repeated prompts after the prefix-cache hit decode as they did the first time
    assert outputs[len(PROMPTS) :] == outputs[:2]
