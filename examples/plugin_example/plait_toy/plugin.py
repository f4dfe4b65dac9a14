"""Device ``toy``: a Backend subclass and the hook that registers it.

Everything not written here is the base class's default: torch tensors on the CPU, a torch
KV pool, the core's slot allocator, eager decode, Plait's torch model, float32, page size 1.
"""

from __future__ import annotations

from plait.backends import hookimpl
from plait.core.backend_api import Backend


class ToyBackend(Backend):
    name = "toy"
    priority = -10  # below the CPU backend (0): device="auto" never picks a toy

    def create_attention_backend(self, kv_pool, num_heads, num_kv_heads, head_dim):
        from plait_toy.attention import ToyAttentionBackend

        return ToyAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim)


@hookimpl
def plait_register_backends(register):
    register(ToyBackend)
