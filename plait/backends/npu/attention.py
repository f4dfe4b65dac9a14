"""Attention through ``torch_npu.npu_fused_infer_attention_score`` (FIA) in its paged mode.

FIA reads K/V straight from the pool: a layer's buffer ``[S, Hkv, D]`` viewed as blocks
``[S // page, page, Hkv * D]`` plus a ``block_table`` ``[B, max_blocks]`` of block ids (the pages
of each request, from ``req_to_token``). Queries use the packed ``TND`` layout: rows of all
requests concatenated, ``actual_seq_lengths`` their cumulative ends, ``actual_seq_lengths_kv``
each request's total length. Extend uses ``sparse_mode=3`` (causal aligned to the bottom right,
so new tokens see the whole prefix) with the op's fixed 2048x2048 upper-triangular mask; decode
(one query per request) needs no mask.

FIA's paged mode takes fp16/bf16 and block sizes that are multiples of 16; the backend's
defaults (bfloat16, page size 128) select it. Other configurations (fp32, page_size 1) run the
torch reference on the NPU, which is correct but slower; so do layers with a sliding window.
"""

from __future__ import annotations

import itertools

import torch

from plait.backends.cpu.attention import TorchAttentionBackend
from plait.core.backend_api import KVPool
from plait.core.forward_batch import ForwardBatch

FIA_DTYPES = (torch.float16, torch.bfloat16)
FIA_BLOCK_MULTIPLE = 16
MASK_SIZE = 2048  # sparse_mode 3 wants this fixed mask whatever the sequence lengths


def fia_supported(dtype: torch.dtype, page_size: int) -> bool:
    return dtype in FIA_DTYPES and page_size % FIA_BLOCK_MULTIPLE == 0


class AscendAttentionBackend(TorchAttentionBackend):
    """FIA where it applies, the inherited torch reference elsewhere."""

    def __init__(
        self, kv_pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int, torch_npu=None
    ):
        super().__init__(kv_pool, num_heads, num_kv_heads, head_dim)
        if torch_npu is None:
            import torch_npu
        self.torch_npu = torch_npu
        self.use_fia = fia_supported(kv_pool.dtype, kv_pool.page_size)
        self._mask: torch.Tensor | None = None

    def _causal_mask(self) -> torch.Tensor:
        if self._mask is None:
            ones = torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool, device=self.kv_pool.device)
            self._mask = torch.triu(ones, diagonal=1)  # True = masked out
        return self._mask

    def _block_table(self, batch: ForwardBatch) -> torch.Tensor:
        ps = self.kv_pool.page_size
        max_seq = max(batch.seq_lens_cpu)
        # Token i sits at offset i % ps of its page, so every ps-th slot names the page.
        rows = batch.req_to_token[batch.req_pool_indices, :max_seq]
        return (rows[:, ::ps] // ps).to(torch.int32)

    def _fia(
        self, q: torch.Tensor, layer_id: int, batch: ForwardBatch, q_lens: list[int], causal: bool
    ) -> torch.Tensor:
        pool, ps = self.kv_pool, self.kv_pool.page_size
        k = pool.k_buffers[layer_id].view(-1, ps, self.num_kv_heads * self.head_dim)
        v = pool.v_buffers[layer_id].view(-1, ps, self.num_kv_heads * self.head_dim)
        extra = (
            {"sparse_mode": 3, "atten_mask": self._causal_mask()} if causal else {"sparse_mode": 0}
        )
        out, _ = self.torch_npu.npu_fused_infer_attention_score(
            q.contiguous(),
            k,
            v,
            block_table=self._block_table(batch),
            input_layout="TND",
            block_size=ps,
            actual_seq_lengths=list(itertools.accumulate(q_lens)),
            actual_seq_lengths_kv=list(batch.seq_lens_cpu),
            num_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            scale=self.scale,
            **extra,
        )
        return out.view(q.shape)

    def _fia_serves(self, q: torch.Tensor, layer_id: int) -> bool:
        # FIA's band mode (sparse_mode 4) could apply a sliding window but has never run
        # here; a windowed layer takes the torch reference, which applies it
        return self.use_fia and q.dtype in FIA_DTYPES and self.window(layer_id) is None

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        if not self._fia_serves(q, layer_id):
            return super().forward_extend(q, layer_id, batch)
        return self._fia(q, layer_id, batch, batch.extend_lens_cpu, causal=True)

    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        if not self._fia_serves(q, layer_id):
            return super().forward_decode(q, layer_id, batch)
        return self._fia(q, layer_id, batch, [1] * batch.batch_size, causal=False)
