"""Registers the TPU backend (entry point ``plait.backends: tpu``).

The model runs in torch on the host (the base class's CPU ``torch_device``); attention runs as
Pallas kernels on the TPU over a KV pool that lives there (jax arrays), with q/k/v crossing by
DLPack.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable

from plait.backends.hookspecs import hookimpl
from plait.core.backend_api import AttentionBackend, Backend, GraphRunner, KVPool


class TpuBackend(Backend):
    name = "tpu"
    priority = 80

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("jax") is None:
            return "jax not installed (pip install plait[tpu])"
        if importlib.util.find_spec("libtpu") is None:
            # Without libtpu jax cannot reach a TPU; answering here avoids importing jax.
            return "no TPU runtime (libtpu not installed)"
        try:
            import jax
            jax.devices("tpu")
        except RuntimeError as e:
            return f"jax sees no TPU ({e})"
        return None

    def jax_device(self) -> Any:
        """Where the KV pool's jax arrays live."""
        import jax
        return jax.devices("tpu")[0]

    def create_kv_pool(self, num_slots: int, num_layers: int, num_kv_heads: int, head_dim: int,
                       dtype: Any, page_size: int) -> KVPool:
        from plait.backends.tpu.attention import JaxKVPool
        return JaxKVPool(num_slots, num_layers, num_kv_heads, head_dim, dtype, page_size,
                         self.jax_device())

    def create_attention_backend(self, kv_pool: KVPool, num_heads: int, num_kv_heads: int,
                                 head_dim: int) -> AttentionBackend:
        from plait.backends.tpu.attention import PallasAttentionBackend
        return PallasAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim)

    def create_graph_runner(self, model: Any, max_batch_size: int) -> GraphRunner | None:
        from plait.backends.tpu.graph import JitBucketCapture
        from plait.core.graph_runner import DecodeGraphRunner
        return DecodeGraphRunner(model, max_batch_size, self.torch_device, JitBucketCapture())


@hookimpl
def plait_register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(TpuBackend)
