"""Multi-head latent attention for the Triton backends (CUDA, ROCm): decode through the
latent kernel (``plait.backends.cuda.mla_decode``), extend through the torch absorbed form
(``plait.backends.cpu.mla_attention``, device-neutral torch)."""

from __future__ import annotations

import torch

from plait.backends.cpu.mla_attention import TorchMLAAttention
from plait.backends.cuda.launch import CUDA_DEFAULT, LaunchParams
from plait.backends.cuda.mla_decode import mla_decode_attention
from plait.core.forward_batch import ForwardBatch
from plait.core.mla import LatentKVPool


class TritonMLAAttention(TorchMLAAttention):
    """Decode reads nothing from the host (lengths and slots stay device tensors), so a
    captured graph can replay it; extend builds its per-request gathers from host lists."""

    def __init__(
        self,
        kv_pool: LatentKVPool,
        num_heads: int,
        scale: float,
        params: LaunchParams = CUDA_DEFAULT,
    ):
        super().__init__(kv_pool, num_heads, scale)
        self.params = params

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        if not batch.is_decode:
            super().init_forward_metadata(batch)

    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        return mla_decode_attention(
            q,
            self.kv_pool.latent_buffers[layer_id],
            self.kv_lora_rank,
            batch.req_to_token,
            batch.req_pool_indices,
            batch.seq_lens,
            self.scale,
            self.params,
        )
