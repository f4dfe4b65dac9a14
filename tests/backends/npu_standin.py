"""A torch_npu stand-in for CPU machines: the ops the NPU backend calls, written from torch-npu's
documentation (``npu_fused_infer_attention_score`` in its MLA mode, ``npu_format_cast``), each
checking the documented constraints it relies on, and recording its calls. With it in
``sys.modules`` the real NPU backend class runs on CPU tensors (:class:`NpuStandIn`)."""

from __future__ import annotations

import types

import torch

from plait.backends.npu.plugin import NpuBackend
from tests.backends.test_npu import fake_fia

CPU = torch.device("cpu")


def fake_fia_mla(
    query,
    key,
    value,
    *,
    query_rope,
    key_rope,
    num_heads,
    num_key_value_heads,
    input_layout,
    scale,
    block_table,
    block_size,
    actual_seq_lengths_kv,
    sparse_mode=0,
    atten_mask=None,
    actual_seq_lengths=None,
):
    """FIA's MLA mode, paged, as documented. ``BSND`` (decode): query [B, 1, N, 512],
    query_rope [B, 1, N, 64], ``sparse_mode`` 0 and no mask. ``TND``: query [T, N, 512], each
    request's 1..16 rows ending at ``actual_seq_lengths[b]`` (cumulative), ``sparse_mode`` 3
    (causal aligned to the bottom right) with the fixed 2048x2048 mask. Key = value = the
    latent pages [blocks, block_size, 512] (one KV head), key_rope [blocks, block_size, 64];
    scores ``scale * (q . k + q_rope . k_rope)`` over each request's first
    ``actual_seq_lengths_kv[b]`` rows, found through ``block_table``."""
    n, d = query.shape[-2:]
    assert num_heads == n and num_key_value_heads == 1 and n in (32, 64, 128)
    assert d == 512 and query_rope.shape == (*query.shape[:-1], 64)
    assert key.shape[1:] == (block_size, 512) and key_rope.shape[1:] == (block_size, 64)
    assert block_size in (16, 128) and value is key
    assert all(t.is_contiguous() for t in (query, key, query_rope, key_rope))
    assert query.dtype in (torch.float16, torch.bfloat16) and key.dtype == query.dtype
    b = len(actual_seq_lengths_kv)
    assert block_table.dtype == torch.int32 and block_table.shape[0] == b
    if input_layout == "BSND":
        assert query.shape[:2] == (b, 1) and sparse_mode == 0 and atten_mask is None
        ends = list(range(1, b + 1))
    else:
        assert input_layout == "TND" and sparse_mode == 3 and len(actual_seq_lengths) == b
        assert atten_mask.shape == (2048, 2048) and atten_mask.dtype == torch.bool
        ends = list(actual_seq_lengths)
    q, qr = query.reshape(-1, n, d), query_rope.reshape(-1, n, 64)
    out = torch.empty_like(q)
    for i, (start, end, kv_len) in enumerate(zip([0, *ends[:-1]], ends, actual_seq_lengths_kv)):
        rows = end - start
        assert 1 <= rows <= 16 and rows <= kv_len
        blocks = block_table[i, : -(-kv_len // block_size)].long()
        c = key[blocks].reshape(-1, d)[:kv_len].float()
        kr = key_rope[blocks].reshape(-1, 64)[:kv_len].float()
        scores = torch.einsum("qhd,kd->hqk", q[start:end].float(), c)
        scores = (scores + torch.einsum("qhd,kd->hqk", qr[start:end].float(), kr)) * scale
        visible = torch.arange(kv_len)[None, :] <= (kv_len - rows + torch.arange(rows))[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start:end] = torch.einsum("hqk,kd->qhd", scores.softmax(-1), c).to(query.dtype)
    return out.view(query.shape), None


def fake_fused_infer_attention_score(*args, **kwargs):
    """The one FIA entry point: its MLA mode when the rope inputs are given."""
    if kwargs.get("query_rope") is not None:
        return fake_fia_mla(*args, **kwargs)
    return fake_fia(*args, **kwargs)


def torch_npu_standin() -> types.ModuleType:
    """A fresh ``torch_npu`` module; ``calls`` lists ``(op, args)`` in call order."""
    mod = types.ModuleType("torch_npu")
    calls: list[tuple[str, tuple]] = []

    def format_cast(tensor, acl_format):
        calls.append(("npu_format_cast", (tensor.data_ptr(), acl_format)))
        return tensor  # the layout changes on an NPU; values, shape and dtype never do

    def fia(*args, **kwargs):
        op = "fia"
        if kwargs.get("query_rope") is not None:
            op = "fia_mla" if kwargs["input_layout"] == "BSND" else "fia_mla_extend"
        calls.append((op, ()))
        return fake_fused_infer_attention_score(*args, **kwargs)

    mod.calls = calls  # type: ignore[attr-defined]
    mod.npu_format_cast = format_cast  # type: ignore[attr-defined]
    mod.npu_fused_infer_attention_score = fia  # type: ignore[attr-defined]
    return mod


class NpuStandIn(NpuBackend):
    """The NPU backend class itself on CPU tensors, its torch_npu the stand-in a test sets in
    ``NpuStandIn.standin`` (``monkeypatch.setattr``). Not through ``sys.modules``: other
    libraries (accelerate) would take a module named torch_npu for an Ascend install."""

    name = "npu-standin"
    priority = -100
    torch_device = CPU  # type: ignore[assignment]
    standin: types.ModuleType | None = None

    def torch_npu_module(self):
        return self.standin

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None
