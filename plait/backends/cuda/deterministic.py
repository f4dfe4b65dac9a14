"""Batch-invariant kernels of the Triton backends for ``--enable-deterministic-inference``
(docs/deterministic.md): a row's result depends on that row alone, not on the rows beside it,
their number, or the phase (prefill or decode) that computes it.

- Attention: every extend token is a decode query of its own (the split-KV decode kernel, one
  row per token, ``seq_len`` its position + 1). The decode kernel's splits are a fixed count
  cut from the row's own length and merged in a fixed order, so a token gets the same sums
  whether it is decoded, prefilled alone, in a batch, in a later chunk, or after a cache hit.
- Linear: :func:`invariant_linear`, one tile shape for every row count and the K dimension
  summed in BLOCK_K steps in order (no split-K, no per-M kernel choice as cuBLAS makes).
- RMSNorm: :func:`invariant_rms_norm`, one program per row over a fixed-width vector.

Tested under Triton's interpreter (``TRITON_INTERPRET=1``) only: never run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from plait.backends.cuda.attention import TritonAttentionBackend, _last_dim_contiguous
from plait.backends.cuda.decode_attention import decode_attention
from plait.backends.cuda.dot_inputs import compute_dtype, dot_precision
from plait.core.backend_api import refuse_experts
from plait.core.forward_batch import ForwardBatch

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 32  # fixed whatever the row count: the invariance


@triton.jit
def _linear_kernel(
    X,
    W,
    B,
    Y,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(
            X + rm[:, None] * stride_xm + kk[None, :],
            mask=(rm[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        ).to(COMPUTE)
        w = tl.load(
            W + rn[None, :] * stride_wn + kk[:, None],
            mask=(rn[None, :] < N) & (kk[:, None] < K),
            other=0.0,
        ).to(COMPUTE)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``x @ weight.T + bias`` with each row's sums in one fixed order (module docstring)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        _linear_kernel[(triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))](
            x2,
            weight,
            bias if bias is not None else weight,
            y,
            m,
            n,
            k,
            x2.stride(0),
            weight.stride(0),
            y.stride(0),
            HAS_BIAS=bias is not None,
            BM=BLOCK_M,
            BN=BLOCK_N,
            BK=BLOCK_K,
            COMPUTE=compute_dtype(x.dtype),
            PRECISION=dot_precision(x.dtype),
        )
    return y.reshape(*shape[:-1], n)


@triton.jit
def _rms_norm_kernel(X, W, Y, N, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    h = x * (1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps))
    w = tl.load(W + offs, mask=mask, other=0.0)
    y = w * h.to(Y.dtype.element_ty)
    tl.store(Y + row * stride_y + offs, y.to(Y.dtype.element_ty), mask=mask)


def invariant_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm (``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``), one program
    per row."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    y = torch.empty_like(x2)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            weight,
            y,
            x2.shape[1],
            x2.stride(0),
            y.stride(0),
            eps,
            BLOCK=triton.next_power_of_2(x2.shape[1]),
        )
    return y.reshape(shape)


class InvariantLinear(nn.Module):
    """An ``nn.Linear`` computed by :func:`invariant_linear` (the same weight tensors)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x, self.weight, self.bias)


class InvariantRMSNorm(nn.Module):
    """An RMSNorm of Llama's formula computed by :func:`invariant_rms_norm`."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, float(norm.eps)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_rms_norm(x, self.weight, self.eps)


def make_invariant(model: nn.Module) -> None:
    """Swap ``model``'s plain Linears and Llama-formula RMSNorms for the invariant kernels, in
    place. ValueError, naming the flag, for a model with other products or norms (they would
    keep batch-dependent kernels)."""
    swaps = []
    refuse_experts(model)
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear or (
                isinstance(child, nn.Linear) and getattr(getattr(child, "tp", None), "size", 2) == 1
            ):
                swaps.append((parent, name, InvariantLinear(child)))
            elif type(child).__name__ == "RMSNorm" and hasattr(child, "eps"):
                swaps.append((parent, name, InvariantRMSNorm(child)))
            elif isinstance(child, nn.Linear) or "norm" in type(child).__name__.lower():
                raise ValueError(
                    "enable_deterministic_inference (--enable-deterministic-inference): "
                    f"{type(child).__name__} layers have no batch-invariant kernel here"
                )
    for parent, name, module in swaps:
        setattr(parent, name, module)


class DeterministicTritonAttention(TritonAttentionBackend):
    """Extend through the decode kernel, one row per new token (module docstring)."""

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        if batch.is_decode:
            return
        dev = batch.extend_lens.device
        reqs = batch.req_pool_indices.tolist()
        rows = [
            (r, p + i + 1)
            for r, p, e in zip(reqs, batch.prefix_lens_cpu, batch.extend_lens_cpu)
            for i in range(e)
        ]
        self._token_reqs = torch.tensor([r for r, _ in rows], dtype=torch.int64, device=dev)
        self._token_lens = torch.tensor([n for _, n in rows], dtype=torch.int64, device=dev)
        self._extend_batch = batch

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        if self._extend_batch is not batch:
            self.init_forward_metadata(batch)
        q = _last_dim_contiguous(q)
        o = torch.empty_like(q)
        if q.shape[0] == 0:
            return o
        pool = self.kv_pool
        return decode_attention(
            q,
            pool.k_buffers[layer_id],
            pool.v_buffers[layer_id],
            o,
            batch.req_to_token,
            self._token_reqs,
            self._token_lens,
            self.scale_of(layer_id),
            self.params,
            self.window(layer_id),
            self.softcap_of(layer_id),
        )
