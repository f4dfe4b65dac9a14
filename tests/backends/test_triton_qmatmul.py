"""The Triton quantized matmul equals dequantize-then-matmul for every format, group size,
tile shape and split-K, in fp32/fp16/bf16: on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py), natively where a CUDA GPU is present."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from plait.backends.cuda.quantized_matmul import (  # noqa: E402
    QMatmulTiles,
    block_k_for,
    choose_tiles,
    quantized_matmul,
)
from plait.testing.cases import QUANT_FORMATS, QuantCase, quant_weight  # noqa: E402
from plait.testing.kit import assert_quantized_close, weight_on  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def problems(draw):
    fmt = draw(st.sampled_from(sorted(QUANT_FORMATS)))
    group = draw(st.sampled_from([32, 64, 128]))
    k = group * draw(st.integers(1, 4))
    if fmt == "int8":
        group = k  # per channel, as quantize_int8 makes it
    case = QuantCase(
        fmt,
        draw(st.integers(1, 64)),
        draw(st.integers(1, 80)),
        k,
        group,
        draw(st.integers(0, 2**16)),
    )
    tiles = QMatmulTiles(
        draw(st.sampled_from([16, 32])),
        draw(st.sampled_from([16, 32, 64])),
        draw(st.sampled_from([b for b in (32, 64, 128) if k % b == 0])),
        draw(st.integers(1, 3)),
        num_warps=4,
        num_stages=1,
    )
    return case, tiles, draw(st.sampled_from(DTYPES))


@settings(max_examples=80, deadline=None)
@given(problems())
def test_matches_dequantized_matmul(problem):
    case, tiles, dtype = problem
    w = quant_weight(case)
    x = torch.randn(case.m, case.k, generator=torch.Generator().manual_seed(case.seed)).to(dtype)
    y = quantized_matmul(x.to(DEVICE), weight_on(w, DEVICE), tiles)
    assert_quantized_close(y, x, w, f"{case.id} {tiles}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chosen_tiles_keep_leading_dims_and_dtype(dtype):
    w = quant_weight(QuantCase("q4_1", 1, 48, 192, 96, seed=1))
    x = torch.randn(2, 3, 192).to(dtype)
    y = quantized_matmul(x.to(DEVICE), weight_on(w, DEVICE))
    assert y.shape == (2, 3, 48)
    assert_quantized_close(y.reshape(6, 48), x.reshape(6, 192), w, "leading dims")


def test_empty_batch_gives_an_empty_result():
    w = weight_on(quant_weight(QuantCase("q4_0", 1, 16, 64, 32)), DEVICE)
    y = quantized_matmul(torch.zeros(0, 64, dtype=torch.float16, device=DEVICE), w)
    assert y.shape == (0, 16) and y.dtype == torch.float16


def test_bad_input_is_refused_with_the_parameter_named():
    w = weight_on(quant_weight(QuantCase("q8_0", 1, 16, 64, 32)), DEVICE)
    with pytest.raises(ValueError, match="features"):
        quantized_matmul(torch.zeros(1, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        quantized_matmul(torch.zeros(1, 64, dtype=torch.float64, device=DEVICE), w)
    with pytest.raises(ValueError, match="block_k"):
        quantized_matmul(
            torch.zeros(1, 96, device=DEVICE),
            weight_on(quant_weight(QuantCase("q8_0", 1, 16, 96, 32)), DEVICE),
            QMatmulTiles(block_k=64),
        )
    with pytest.raises(ValueError, match="block_n"):
        QMatmulTiles(block_n=24)


def test_tiles_divide_k_and_split_only_small_outputs():
    assert [block_k_for(k) for k in (32, 64, 96, 576, 1536)] == [32, 64, 32, 64, 128]
    decode = choose_tiles(1, 576, 1536, num_sms=132)
    assert decode.block_m == 16 and decode.split_k > 1
    assert choose_tiles(1, 576, 1536, num_sms=0).split_k == 1  # interpreter: no SMs
    assert choose_tiles(512, 49152, 576, num_sms=132).split_k == 1
