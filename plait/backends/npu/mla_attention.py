"""Multi-head latent attention (DeepSeek-V2/V3) on Ascend: decode and short extends through
torch-npu's fused inference attention in its MLA mode, over a latent pool split the way that
mode reads it.

FIA's MLA mode (``query_rope`` and ``key_rope`` given; torch_npu's
``npu_fused_infer_attention_score`` documentation) scores each head as
``q_nope . c + q_rope . k_rope`` and returns the probability-weighted ``c`` rows: exactly the
absorbed form of ``plait.core.mla``, with the latent ``c`` as key and value (one KV head) and the
RoPE parts passed separately. Each of ``key``/``value``/``key_rope`` must be contiguous, paged
``[blocks, block_size, D]``, so the NPU pool keeps ``c`` and ``k_rope`` in two buffers per layer
(:class:`SplitLatentKVPool`) instead of the core's one ``[c | k_rope]`` row.

What the documentation allows, and so what takes FIA here (anything else runs the torch
absorbed form of ``plait.backends.cpu.mla_attention`` over the same split buffers, correct on
the NPU but slower): fp16/bf16; ``kv_lora_rank`` 512 and ``qk_rope_head_dim`` 64
(DeepSeek-V2/V3's sizes); 32, 64 or 128 query heads (V2-Lite's 16 do not qualify); block size
16 or 128; at most 16 new tokens per request (decode; small extends such as short chunks or
cached prompts' tails). Longer extends (prefill) run the torch absorbed form.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from plait.backends.cpu.mla_attention import TorchMLAAttention, mla_decode_ref, mla_extend_ref
from plait.core.forward_batch import ForwardBatch
from plait.core.kv_layout import KVCacheLayout
from plait.core.mla import LatentKVPool

FIA_MLA_LATENT = 512
FIA_MLA_ROPE = 64
FIA_MLA_HEADS = (32, 64, 128)
FIA_MLA_BLOCKS = (16, 128)
FIA_DTYPES = (torch.float16, torch.bfloat16)
FIA_MLA_MAX_QUERIES = 16  # new tokens per request the MLA mode takes
MASK_SIZE = 2048  # sparse_mode 3 wants this fixed mask whatever the sequence lengths


def mla_fia_supported(
    dtype: torch.dtype, page_size: int, num_heads: int, kv_lora_rank: int, rope_dim: int
) -> bool:
    """Whether FIA's documented MLA mode accepts this configuration (module doc)."""
    return (
        dtype in FIA_DTYPES
        and page_size in FIA_MLA_BLOCKS
        and num_heads in FIA_MLA_HEADS
        and (kv_lora_rank, rope_dim) == (FIA_MLA_LATENT, FIA_MLA_ROPE)
    )


class SplitLatentKVPool(LatentKVPool):
    """A latent pool with ``c`` and ``k_rope`` in separate contiguous buffers per layer:
    ``nope_buffers[layer]`` [S, 1, kv_lora_rank] and ``rope_buffers[layer]`` [S, 1, rope_dim].

    ``k_buffers``/``v_buffers`` are these two lists, so code that copies a slot through every
    K and V buffer (``concate_and_append`` over KV, disaggregation's transfer) moves both
    parts. There is no ``latent_buffers``: the combined row does not exist here, and code that
    would read it fails loudly instead of reading half a row.
    """

    def __init__(
        self,
        layout: KVCacheLayout,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device | str,
        page_size: int = 1,
    ):
        # the base class would allocate the combined rows: only its fields are set
        size = self._set_fields(layout, num_slots, dtype, device, page_size)
        self.rope_dim = layout.head_dim - layout.latent_rank
        self.nope_buffers = [
            torch.zeros(size, 1, self.kv_lora_rank, dtype=dtype, device=device)
            for _ in range(layout.num_layers)
        ]
        self.rope_buffers = [
            torch.zeros(size, 1, self.rope_dim, dtype=dtype, device=device)
            for _ in range(layout.num_layers)
        ]
        self.k_buffers = self.nope_buffers
        self.v_buffers = self.rope_buffers

    def set_latent(self, layer_id: int, loc: torch.Tensor, latent: torch.Tensor) -> None:
        rows = latent.to(self.dtype).unsqueeze(1)
        self.nope_buffers[layer_id][loc] = rows[..., : self.kv_lora_rank]
        self.rope_buffers[layer_id][loc] = rows[..., self.kv_lora_rank :]


class SplitRows:
    """A layer's two buffers read as the core's ``[c | k_rope]`` rows: ``index_select``
    gathers both parts of the chosen slots and joins them (what the torch reference reads)."""

    def __init__(self, pool: SplitLatentKVPool, layer_id: int):
        self.nope = pool.nope_buffers[layer_id]
        self.rope = pool.rope_buffers[layer_id]

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            (self.nope.index_select(dim, index), self.rope.index_select(dim, index)), -1
        )


class AscendMLAAttention(TorchMLAAttention):
    """FIA's MLA mode where the documentation allows it (decode; extends of at most 16 new
    tokens per request), the torch absorbed form elsewhere; both over a
    :class:`SplitLatentKVPool`. Which one a batch takes is decided once, in
    :meth:`init_forward_metadata`."""

    kv_pool: SplitLatentKVPool

    def __init__(
        self, kv_pool: SplitLatentKVPool, num_heads: int, scale: float, torch_npu: Any = None
    ):
        super().__init__(kv_pool, num_heads, scale)
        if torch_npu is None:
            import torch_npu
        self.torch_npu = torch_npu
        self.use_fia = mla_fia_supported(
            kv_pool.dtype, kv_pool.page_size, num_heads, kv_pool.kv_lora_rank, kv_pool.rope_dim
        )
        self._block_table: torch.Tensor | None = None  # set: this batch runs FIA
        self._mask: torch.Tensor | None = None

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        self._block_table = None
        if self.use_fia and max(batch.extend_lens_cpu) <= FIA_MLA_MAX_QUERIES:
            ps = self.kv_pool.page_size
            rows = batch.req_to_token[batch.req_pool_indices, : max(batch.seq_lens_cpu)]
            # token i sits at offset i % ps of its page, so every ps-th slot names the page
            self._block_table = (rows[:, ::ps] // ps).to(torch.int32)
            return
        super().init_forward_metadata(batch)

    def _fia_takes(self, q: torch.Tensor, batch: ForwardBatch) -> bool:
        if self._block_table is not None and q.dtype in FIA_DTYPES:
            return True
        if self._block_table is not None:  # FIA's metadata, a query FIA does not take
            self._block_table = None
            TorchMLAAttention.init_forward_metadata(self, batch)
        return False

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        if self._fia_takes(q, batch):
            return self._fia(q, layer_id, batch)
        return mla_extend_ref(
            q,
            SplitRows(self.kv_pool, layer_id),  # type: ignore[arg-type]  # duck-typed rows
            self.kv_lora_rank,
            batch.req_to_token,
            self._req_rows,
            batch.prefix_lens_cpu,
            batch.extend_lens_cpu,
            self.scale,
        )

    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        if self._fia_takes(q, batch):
            return self._fia(q, layer_id, batch)
        if self._decode is None:
            TorchMLAAttention.init_forward_metadata(self, batch)
        assert self._decode is not None
        slots, bias = self._decode
        rows = SplitRows(self.kv_pool, layer_id)
        return mla_decode_ref(q, rows, self.kv_lora_rank, slots, bias, self.scale)  # type: ignore[arg-type]

    def _causal_mask(self) -> torch.Tensor:
        if self._mask is None:
            ones = torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool, device=self.kv_pool.device)
            self._mask = torch.triu(ones, diagonal=1)  # True = masked out
        return self._mask

    def _fia(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        """Decode: ``BSND`` with S = 1, no mask. Extend: ``TND`` (requests' rows concatenated,
        ``actual_seq_lengths`` their cumulative ends) with ``sparse_mode`` 3, causal aligned to
        the bottom right so new tokens see the cached prefix, and the op's fixed mask."""
        pool, ps, rank, h = self.kv_pool, self.kv_pool.page_size, self.kv_lora_rank, self.num_heads
        lead = (q.shape[0], 1) if batch.is_decode else (q.shape[0],)
        q_nope = q[..., :rank].contiguous().view(*lead, h, rank)
        q_rope = q[..., rank:].contiguous().view(*lead, h, pool.rope_dim)
        c = pool.nope_buffers[layer_id].view(-1, ps, rank)  # key and value: one KV head
        k_rope = pool.rope_buffers[layer_id].view(-1, ps, pool.rope_dim)
        mode: dict[str, Any] = (
            {"input_layout": "BSND", "sparse_mode": 0}
            if batch.is_decode
            else {
                "input_layout": "TND",
                "sparse_mode": 3,
                "atten_mask": self._causal_mask(),
                "actual_seq_lengths": list(itertools.accumulate(batch.extend_lens_cpu)),
            }
        )
        out, _ = self.torch_npu.npu_fused_infer_attention_score(
            q_nope,
            c,
            c,
            query_rope=q_rope,
            key_rope=k_rope,
            num_heads=h,
            num_key_value_heads=1,
            scale=self.scale,
            block_table=self._block_table,
            block_size=ps,
            actual_seq_lengths_kv=list(batch.seq_lens_cpu),
            **mode,
        )
        return out.view(q.shape[0], h, rank)
