"""Registers the CPU backend (entry point ``plait.backends: cpu``): the base class's defaults
plus the torch reference attention and the C++ quantized matmul."""
from __future__ import annotations

import logging
from typing import Callable

from plait.backends.hookspecs import hookimpl
from plait.core.backend_api import AttentionBackend, Backend, KVPool

log = logging.getLogger(__name__)


class CpuBackend(Backend):
    name = "cpu"
    priority = 0  # the fallback: every accelerator outranks it

    def create_attention_backend(self, kv_pool: KVPool, num_heads: int, num_kv_heads: int,
                                 head_dim: int) -> AttentionBackend:
        from plait.backends.cpu.attention import TorchAttentionBackend
        return TorchAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim)

    def quantized_linear(self, method: str):
        """``qmatmul.cpp`` (AVX2 where the CPU has it); the torch default if it cannot be
        compiled here (no C++ compiler), with a warning since that path is slow."""
        from plait.backends.cpu.qmatmul import cpu_quantized_matmul
        try:
            return cpu_quantized_matmul()
        except Exception as e:  # a missing compiler surfaces as several error types
            log.warning("quantized CPU kernel unavailable (%s); using the slow torch path", e)
            return super().quantized_linear(method)


@hookimpl
def plait_register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(CpuBackend)
