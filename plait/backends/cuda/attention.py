"""TritonAttentionBackend: the extend and split-KV decode kernels behind the core's contract."""

from __future__ import annotations

import itertools

import torch

from plait.backends.cuda.decode_attention import decode_attention
from plait.backends.cuda.extend_attention import extend_attention
from plait.backends.cuda.launch import CUDA_DEFAULT, LaunchParams
from plait.core.backend_api import AttentionBackend, KVPool
from plait.core.forward_batch import ForwardBatch


class TritonAttentionBackend(AttentionBackend):
    """Attention with Triton kernels; shared by the CUDA and ROCm backends (``params`` differ).

    Works on any tensors Triton can address: CUDA/HIP memory, or CPU memory under the Triton
    interpreter (``TRITON_INTERPRET=1``), which is how CI checks these kernels.

    Sliding windows, per-layer softmax scales and attention-logit caps (Gemma): both kernels
    take the layer's (``sliding_windows``, ``layer_scales``, ``logit_softcaps``).

    Decode reads nothing from the host (no ``.item()``, no host lists), so it can run inside a
    captured graph. Extend needs each request's first row in ``q``; that is built once per
    batch in :meth:`init_forward_metadata` (or lazily on the first layer).
    """

    supports_sliding_window = True
    supports_logit_softcap = True
    supports_layer_scales = True

    def __init__(
        self,
        kv_pool: KVPool,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        params: LaunchParams = CUDA_DEFAULT,
    ):
        super().__init__(kv_pool, num_heads, num_kv_heads, head_dim)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
            )
        self.params = params
        self._extend_batch: ForwardBatch | None = None
        self._extend_start: torch.Tensor | None = None

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        if batch.is_decode:
            return
        starts = list(itertools.accumulate(batch.extend_lens_cpu, initial=0))[:-1]
        self._extend_start = torch.tensor(
            starts, dtype=torch.int64, device=batch.extend_lens.device
        )
        self._extend_batch = batch

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        if self._extend_batch is not batch:
            self.init_forward_metadata(batch)
        q = _last_dim_contiguous(q)
        o = torch.empty_like(q)
        if q.shape[0] == 0:
            return o
        pool = self.kv_pool
        return extend_attention(
            q,
            pool.k_buffers[layer_id],
            pool.v_buffers[layer_id],
            o,
            batch.req_to_token,
            batch.req_pool_indices,
            batch.prefix_lens,
            batch.extend_lens,
            self._extend_start,
            max(batch.extend_lens_cpu),
            self.scale_of(layer_id),
            self.params,
            self.window(layer_id),
            self.softcap_of(layer_id),
        )

    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        q = _last_dim_contiguous(q)
        o = torch.empty_like(q)
        pool = self.kv_pool
        return decode_attention(
            q,
            pool.k_buffers[layer_id],
            pool.v_buffers[layer_id],
            o,
            batch.req_to_token,
            batch.req_pool_indices,
            batch.seq_lens,
            self.scale_of(layer_id),
            self.params,
            self.window(layer_id),
            self.softcap_of(layer_id),
        )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels step through head_dim with unit stride; token and head strides may be anything.
    return x if x.stride(-1) == 1 else x.contiguous()
