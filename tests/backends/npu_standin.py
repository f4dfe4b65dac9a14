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
):
    """FIA's MLA mode, decode, paged BSND, as documented: query [B, 1, N, 512] and query_rope
    [B, 1, N, 64]; key = value = the latent pages [blocks, block_size, 512] (one KV head),
    key_rope [blocks, block_size, 64]; scores ``scale * (q . k + q_rope . k_rope)`` over each
    request's first ``actual_seq_lengths_kv[b]`` rows, found through ``block_table``."""
    b, s, n, d = query.shape
    assert input_layout == "BSND" and s == 1 and num_heads == n and num_key_value_heads == 1
    assert d == 512 and query_rope.shape == (b, 1, n, 64) and n in (32, 64, 128)
    assert key.shape[1:] == (block_size, 512) and key_rope.shape[1:] == (block_size, 64)
    assert block_size in (16, 128) and sparse_mode == 0 and atten_mask is None
    assert all(t.is_contiguous() for t in (query, key, value, query_rope, key_rope))
    assert query.dtype in (torch.float16, torch.bfloat16) and key.dtype == query.dtype
    assert block_table.dtype == torch.int32 and block_table.shape[0] == b
    assert len(actual_seq_lengths_kv) == b
    out = torch.empty_like(query)
    for i, kv_len in enumerate(actual_seq_lengths_kv):
        blocks = block_table[i, : -(-kv_len // block_size)].long()
        c = key[blocks].reshape(-1, d)[:kv_len].float()
        v = value[blocks].reshape(-1, d)[:kv_len].float()
        kr = key_rope[blocks].reshape(-1, 64)[:kv_len].float()
        scores = (query[i, 0].float() @ c.T + query_rope[i, 0].float() @ kr.T) * scale
        out[i, 0] = (scores.softmax(-1) @ v).to(query.dtype)
    return out, None


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
        calls.append(("fia_mla" if kwargs.get("query_rope") is not None else "fia", ()))
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
