"""Every quantized matmul equals dequantize-then-matmul (float tolerance) for every format,
group size and odd shape; the CPU kernel's AVX2 and portable builds alike."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plait.quant.formats import QuantizedWeight, dequantize, quantize_int4, quantize_int8
from plait.quant.modules import torch_quantized_matmul

FORMATS = ["int8", "int4-asym", "int4-sym"]


def make_weight(fmt: str, n: int, k: int, group: int, seed: int) -> QuantizedWeight:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "q8_0":  # GGUF-style 8-bit with groups of 32: random codes, random scales
        g = torch.Generator().manual_seed(seed)
        return QuantizedWeight(8, 32, torch.randint(-127, 128, (n, k), generator=g,
                                                    dtype=torch.int8),
                               (torch.rand(n, k // 32, generator=g) / 50).half())
    return quantize_int4(w, group, symmetric=fmt == "int4-sym")


def assert_matches_reference(matmul, x: torch.Tensor, w: QuantizedWeight) -> None:
    dense = dequantize(w).double()
    ref = x.double() @ dense.T
    # float32 accumulation in any order: bounded by eps * sum |x_k w_k| per output
    bound = 1e-5 * (x.double().abs() @ dense.abs().T) + 1e-6
    got = matmul(x, w)
    assert got.shape == ref.shape and got.dtype == x.dtype
    assert ((got.double() - ref).abs() <= bound).all()


@pytest.fixture(scope="module")
def cpu_matmul():
    from plait.backends.cpu.qmatmul import cpu_quantized_matmul
    return cpu_quantized_matmul()


shapes = st.tuples(st.integers(1, 19), st.integers(1, 37), st.integers(1, 8),
                   st.sampled_from(FORMATS + ["q8_0"]), st.sampled_from([32, 64, 128]),
                   st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_cpu_kernel_matches_dequantized_reference(cpu_matmul, shape):
    m, n, blocks, fmt, group, seed = shape
    k = 32 * blocks
    if fmt.startswith("int4") and k % group:
        group = 32
    w = make_weight(fmt, n, k, group, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1))
    assert_matches_reference(cpu_matmul, x, w)


@pytest.mark.parametrize("fmt", FORMATS + ["q8_0"])
def test_torch_default_matches_dequantized_reference(fmt):
    w = make_weight(fmt, 33, 192, 64, 0)
    assert_matches_reference(torch_quantized_matmul, torch.randn(5, 192), w)


def test_cpu_kernel_keeps_leading_dims_and_dtype(cpu_matmul):
    w = make_weight("int4-asym", 40, 128, 128, 3)
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    y = cpu_matmul(x, w)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), x.float() @ dequantize(w).T, atol=0.1, rtol=0.02)


def test_cpu_kernel_has_the_simd_path_where_the_cpu_does():
    from plait.backends.cpu.cpp_build import has_avx2
    from plait.backends.cpu.qmatmul import extension
    assert extension().simd() == has_avx2()


@pytest.mark.slow  # compiles a second build of the extension (about a minute, then cached)
@pytest.mark.parametrize("fmt", FORMATS + ["q8_0"])
def test_portable_kernel_matches_dequantized_reference(fmt):
    from plait.backends.cpu.qmatmul import cpu_quantized_matmul, extension
    assert not extension(simd=False).simd()
    for m, n in [(1, 7), (9, 33), (17, 5)]:
        w = make_weight(fmt, n, 192, 64, m)
        assert_matches_reference(cpu_quantized_matmul(simd=False), torch.randn(m, 192), w)
