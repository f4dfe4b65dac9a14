"""The Triton latent decode kernel (multi-head latent attention, CUDA/ROCm) under Triton's
interpreter: against the torch absorbed form, and inside a DeepSeek-V3 model in the engine,
where greedy tokens must equal transformers'."""

import os

import pytest
import torch

import plait

pytest.importorskip("triton")

from plait.backends.cpu.mla_attention import mla_decode_ref  # noqa: E402
from plait.backends.cuda.launch import INTERPRETER  # noqa: E402
from plait.backends.cuda.mla_decode import mla_decode_attention  # noqa: E402
from tests.backends.test_triton_kernels import TritonInterpreted  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 (CPU-only machine)",
)


@pytest.mark.parametrize(
    "heads,rank,rope,lens",
    [(5, 24, 8, [37, 5, 70]), (16, 16, 16, [1]), (18, 20, 4, [33])],
    ids=["odd-heads", "one-token", "two-head-blocks"],
)
def test_latent_decode_kernel_matches_torch(heads, rank, rope, lens):
    torch.manual_seed(0)
    slots_total = 200
    buffer = torch.randn(slots_total, 1, rank + rope)
    q = torch.randn(len(lens), heads, rank + rope)
    req_to_token = torch.zeros(len(lens) + 1, 100, dtype=torch.int32)
    for b, n in enumerate(lens):  # scattered slots: the kernel must follow req_to_token
        req_to_token[b + 1, :n] = torch.randperm(slots_total - 1)[:n] + 1
    rows = torch.arange(1, len(lens) + 1)
    seq_lens = torch.tensor(lens)
    got = mla_decode_attention(q, buffer, rank, req_to_token, rows, seq_lens, 0.3, INTERPRETER)
    longest = max(lens)
    valid = torch.arange(longest)[None, :] < seq_lens[:, None]
    slots = req_to_token[rows, :longest].long().masked_fill(~valid, 0)
    bias = torch.zeros(valid.shape).masked_fill(~valid, float("-inf"))[:, None, :]
    want = mla_decode_ref(q, buffer, rank, slots, bias, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_deepseek_greedy_through_the_kernel_matches_transformers(tmp_path, smollm_dir):
    """DeepSeek-V3 on the Triton backend (interpreted): decode runs the latent kernel, and
    the tokens are transformers', batched, chunked and after a prefix-cache hit."""
    from plait.backends.cuda.mla_attention import TritonMLAAttention
    from plait.testing.register import temporarily_registered
    from tests.conftest import hf_greedy
    from tests.models.deepseek_tiny import hf_model, write_tiny_deepseek

    path = write_tiny_deepseek("v3", tmp_path / "v3", smollm_dir)
    prompts = [[5, 17, 300, 42, 9000, 77, 12, 13, 14], [5, 17, 300, 42, 9000, 77, 1000]]
    want = hf_greedy(hf_model(path), prompts, 6)
    greedy = {"max_new_tokens": 6, "temperature": 0}
    with temporarily_registered(TritonInterpreted) as name:
        with plait.Engine(
            path, device=name, dtype="float32", max_total_tokens=512, chunked_prefill_size=4
        ) as engine:
            assert isinstance(engine.scheduler.runner.attn, TritonMLAAttention)
            for _ in range(2):  # the second round hits the prefix cache
                outs = engine.generate(input_ids=prompts, sampling_params=greedy)
                assert [o["output_ids"] for o in outs] == want
            assert outs[0]["meta_info"]["cached_tokens"] == len(prompts[0]) - 1
