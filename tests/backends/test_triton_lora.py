"""The Triton LoRA shrink/expand kernels (CUDA/ROCm) equal the torch path they replace, under
Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), on a batch mixing adapters,
the base model and segment lengths above and below a tile."""

import os

import pytest
import torch

pytest.importorskip("triton")

from plait.lora.ops import LoraBatch, apply_grouped  # noqa: E402
from plait.lora.triton_ops import apply_segmented  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (CPU-only)"
)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-2)], ids=["fp32", "fp16"]
)
def test_segmented_kernels_equal_the_torch_path(dtype, tol):
    torch.manual_seed(0)
    slots_n, k, n_in, n_out = 3, 24, 40, 70  # K and the widths off the tile sizes on purpose
    slots = [1, None, 0, 1, 2, None]
    lens = [5, 3, 19, 1, 2, 4]  # 19 rows span two 16-row tiles
    scaling = [0.5, 2.0, 1.25, 0.0]
    t = sum(lens)
    x = torch.randn(t, n_in).to(dtype)
    a = (torch.randn(slots_n + 1, k, n_in) * 0.3).to(dtype)
    b = (torch.randn(slots_n + 1, n_out, k) * 0.3).to(dtype)
    base = torch.randn(t, n_out).to(dtype)
    batch = LoraBatch.build(slots, lens, scaling, torch.device("cpu"))
    want = apply_grouped(x.float(), base.float().clone(), a.float(), b.float(), batch)
    got = apply_segmented(x, base.clone(), a, b, batch)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    # base rows (slot None) are untouched, bit for bit
    assert torch.equal(got[5:8], base[5:8]) and torch.equal(got[-4:], base[-4:])


def test_kernels_really_run_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    from plait.lora import triton_ops

    for kernel in (triton_ops._shrink, triton_ops._expand):
        assert isinstance(kernel, InterpretedFunction)
