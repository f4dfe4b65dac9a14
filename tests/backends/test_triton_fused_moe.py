"""The CUDA/ROCm backend's Triton fused-MoE kernel (``plait.backends.cuda.fused_moe``) equals
the portable torch op under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py):
fp32 to float rounding, fp16 to its tolerance, with experts left unused, ragged sizes (H and
I no multiple of the tiles) and one token as in decode."""

import os

import pytest
import torch

pytest.importorskip("triton")

from plait.backends.cuda import fused_moe as triton_moe  # noqa: E402
from plait.backends.cuda.triton_backend import TritonBackend  # noqa: E402
from plait.ops.fused_moe import fused_experts  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 (CPU-only machine)",
)


def case(t, e, h, inter, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g)
    w_gate_up = torch.randn(e, 2 * inter, h, generator=g) * 0.2
    w_down = torch.randn(e, h, inter, generator=g) * 0.2
    probs = torch.softmax(torch.randn(t, e, generator=g), -1)
    weights, ids = torch.topk(probs, k, dim=-1)
    return [x.to(dtype) for x in (hidden, w_gate_up, w_down)] + [weights, ids]


def test_kernels_really_run_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(triton_moe._gate_up_kernel, InterpretedFunction)
    assert isinstance(triton_moe._down_kernel, InterpretedFunction)


def test_the_backend_hands_out_the_triton_op():
    assert TritonBackend.fused_moe(TritonBackend.__new__(TritonBackend)) is (
        triton_moe.fused_experts_triton
    )


@pytest.mark.parametrize(
    "t,e,h,inter,k",
    [(1, 4, 64, 32, 2), (13, 6, 48, 40, 2), (37, 8, 64, 16, 3)],
    ids=["decode-1", "ragged-13", "prefill-37"],
)
def test_triton_matches_the_torch_op_float32(t, e, h, inter, k):
    args = case(t, e, h, inter, k, seed=t)
    want = fused_experts(*args)
    got = triton_moe.fused_experts_triton(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh"])
def test_triton_activations(activation):
    args = case(9, 4, 32, 32, 2, seed=4)
    want = fused_experts(*args, activation=activation)
    got = triton_moe.fused_experts_triton(*args, activation=activation)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_triton_matches_the_torch_op_float16():
    args = case(11, 4, 64, 32, 2, seed=2, dtype=torch.float16)
    want = fused_experts(*[a.float() if a.is_floating_point() else a for a in args])
    got = triton_moe.fused_experts_triton(*args)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_alignment_groups_pairs_by_expert_in_padded_blocks():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [1, 0]])
    sorted_pairs, block_expert = triton_moe.align_by_expert(ids, 5, 4)
    n = ids.numel()
    # experts 0, 1, 3 have pairs: one block each; capacity leaves trailing blocks unused
    assert block_expert.tolist()[:3] == [0, 1, 3] and all(b == 5 for b in block_expert[3:])
    blocks = sorted_pairs.view(-1, 4).tolist()
    assert blocks[0] == [1, 4, 7, n]  # expert 0's pairs in token order, then padding
    assert blocks[1] == [3, 6, n, n]
    assert blocks[2] == [0, 2, 5, n]
    assert all(p == n for row in blocks[3:] for p in row)
