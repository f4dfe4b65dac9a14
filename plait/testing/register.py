"""Expose a hand-built :class:`~plait.testing.kit.KitBackend` as a registered device, so that
``plait.Engine(device=kb.name)`` runs on it (e.g. Triton kernels under the interpreter)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from plait.backends import registry
from plait.backends.hookspecs import hookimpl
from plait.core.backend_api import BackendInfo
from plait.testing.kit import KitBackend


class KitPlugin:
    """A plugin object answering the hooks for ``kb.name`` from ``kb``'s factories.

    Its priority is below every real backend's, so ``--device auto`` never picks it."""

    def __init__(self, kb: KitBackend):
        self.kb = kb

    def _mine(self, device: str) -> bool:
        return device == self.kb.name

    @hookimpl
    def plait_backend_info(self) -> BackendInfo:
        return BackendInfo(self.kb.name, -100, True)

    @hookimpl
    def plait_torch_device(self, device: str) -> Any:
        return self.kb.device if self._mine(device) else None

    @hookimpl
    def plait_create_kv_pool(self, device, num_slots, num_layers, num_kv_heads, head_dim, dtype,
                             page_size):
        if self._mine(device):
            return self.kb.make_kv_pool(num_slots, num_layers, num_kv_heads, head_dim, dtype,
                                        page_size)
        return None

    @hookimpl
    def plait_create_allocator(self, device, num_slots, page_size):
        if self._mine(device) and self.kb.make_allocator is not None:
            return self.kb.make_allocator(num_slots, page_size)
        return None

    @hookimpl
    def plait_create_attention_backend(self, device, kv_pool, num_heads, num_kv_heads, head_dim):
        if self._mine(device):
            return self.kb.make_attention(kv_pool, num_heads, num_kv_heads, head_dim)
        return None

    @hookimpl
    def plait_create_graph_runner(self, device, model, max_batch_size):
        if self._mine(device) and self.kb.make_graph_runner is not None:
            return self.kb.make_graph_runner(model, max_batch_size)
        return None


@contextlib.contextmanager
def temporarily_registered(kb: KitBackend) -> Iterator[str]:
    """Register ``kb`` under ``kb.name`` for the duration of the block; yields the name."""
    if kb.registered:
        yield kb.name
        return
    plugin = KitPlugin(kb)
    registry.register(plugin, name=f"plait-testing-{kb.name}")
    try:
        yield kb.name
    finally:
        registry.plugin_manager().unregister(plugin)
        registry.available_backends.cache_clear()
