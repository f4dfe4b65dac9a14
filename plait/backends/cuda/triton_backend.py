"""The Backend shared by the Triton devices (CUDA and ROCm).

Both run the same kernels on a torch ``"cuda"`` device (ROCm builds expose HIP that way) and
record decode with ``torch.cuda.CUDAGraph`` (a HIP graph on ROCm); they differ only in
detection and launch parameters, which each subclass sets. Importing this module does not
import triton: the kernels are imported when the attention backend (or the quantized matmul)
is created.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from plait.backends.cuda.launch import CUDA_DEFAULT, LaunchParams
from plait.core.backend_api import (
    AttentionBackend,
    Backend,
    GraphRunner,
    KVPool,
    ModelSpec,
    refuse_int8_activations,
)

if TYPE_CHECKING:
    from plait.core.memory import ReqToTokenPool
    from plait.core.model_runner import ModelRunner
    from plait.core.mla import LatentKVPool, MLAAttentionBackend
    from plait.ops.fused_moe import FusedExperts
    from plait.quant.modules import QuantizedMatmul


class TritonBackend(Backend):
    #: tile sizes and launch options for the shared kernels
    launch: ClassVar[LaunchParams] = CUDA_DEFAULT
    torch_device = torch.device("cuda")
    distributed_backend = "nccl"  # RCCL answers to "nccl" in ROCm builds of torch
    decode_modes = frozenset({"eager", "captured"})
    default_graph_capture = True  # CUDA/HIP graphs capture in seconds
    supports_deterministic_inference = True  # plait.backends.cuda.deterministic

    def free_memory_bytes(self) -> int:
        """Free memory on the current CUDA/HIP device (``torch.cuda.mem_get_info``)."""
        return torch.cuda.mem_get_info()[0]

    def create_model_runner(
        self, spec: ModelSpec, kv_pool: KVPool, req_pool: "ReqToTokenPool"
    ) -> "ModelRunner":
        """The default runner; with ``spec.deterministic`` its Linears, RMSNorms and attention
        on the batch-invariant kernels (``plait.backends.cuda.deterministic``)."""
        from plait.core.model_runner import default_model_runner

        runner = default_model_runner(self, spec, kv_pool, req_pool)
        if spec.deterministic:
            from plait.backends.cuda.attention import TritonAttentionBackend
            from plait.backends.cuda.deterministic import (
                DeterministicTritonAttention,
                make_invariant,
            )

            old = runner.attn
            if type(old) is not TritonAttentionBackend:
                raise ValueError(
                    "enable_deterministic_inference (--enable-deterministic-inference): "
                    "latent (MLA) attention has no batch-invariant kernel here"
                )
            make_invariant(runner.model)
            attn = DeterministicTritonAttention(
                old.kv_pool, old.num_heads, old.num_kv_heads, old.head_dim, self.launch
            )
            attn.set_sliding_windows(old.sliding_windows)
            attn.set_layer_scales(old.layer_scales)
            attn.set_logit_softcaps(old.logit_softcaps)
            runner.attn = attn
        if self.torch_device.type == "cuda":  # greedy tokens reach the host without a sync
            from plait.backends.cuda.token_copy import AsyncTokenCopy, install

            install(runner, AsyncTokenCopy(self.torch_device, capacity=256))
        return runner

    def create_attention_backend(
        self, kv_pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int
    ) -> AttentionBackend:
        from plait.backends.cuda.attention import TritonAttentionBackend

        return TritonAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim, self.launch)

    def create_mla_attention_backend(
        self, kv_pool: "LatentKVPool", num_heads: int, scale: float
    ) -> "MLAAttentionBackend":
        """Latent decode kernel, torch extend (``plait.backends.cuda.mla_attention``)."""
        from plait.backends.cuda.mla_attention import TritonMLAAttention

        return TritonMLAAttention(kv_pool, num_heads, scale, self.launch)

    def quantized_linear(self, method: str, activations: str = "float") -> "QuantizedMatmul":
        """The Triton dequant-GEMM (``plait.backends.cuda.quantized_matmul``) for every
        method: int8, int4 and GGUF Q4_0/Q4_1/Q8_0 all arrive as a ``QuantizedWeight``.
        Activations stay in the model dtype (no int8-activation kernel here)."""
        refuse_int8_activations(self.name, activations)
        from plait.backends.cuda.quantized_matmul import quantized_matmul

        return quantized_matmul

    def fused_moe(self) -> "FusedExperts":
        """The Triton grouped-GEMM MoE (``plait.backends.cuda.fused_moe``): pairs sorted and
        padded per expert on the device, two launches, capturable in a CUDA graph."""
        from plait.backends.cuda.fused_moe import fused_experts_triton

        return fused_experts_triton

    def create_graph_runner(self, model: Any, max_batch_size: int) -> GraphRunner | None:
        from plait.backends.cuda.graph_capture import TorchCudaGraphCapture
        from plait.core.graph_runner import DecodeGraphRunner

        return DecodeGraphRunner(model, max_batch_size, self.torch_device, TorchCudaGraphCapture())
