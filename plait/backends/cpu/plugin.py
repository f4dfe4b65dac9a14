"""Registers the CPU backend (entry point ``plait.backends: cpu``): the base class's defaults
plus the torch reference attention."""
from __future__ import annotations

from typing import Callable

from plait.backends.hookspecs import hookimpl
from plait.core.backend_api import AttentionBackend, Backend, KVPool


class CpuBackend(Backend):
    name = "cpu"
    priority = 0  # the fallback: every accelerator outranks it

    def create_attention_backend(self, kv_pool: KVPool, num_heads: int, num_kv_heads: int,
                                 head_dim: int) -> AttentionBackend:
        from plait.backends.cpu.attention import TorchAttentionBackend
        return TorchAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim)


@hookimpl
def plait_register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(CpuBackend)
