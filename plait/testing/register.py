"""Register a :class:`~plait.core.backend_api.Backend` class for the length of a block, so that
``plait.Engine(device=cls.name)`` runs on it (e.g. Triton kernels under the interpreter)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from plait.backends import registry
from plait.backends.hookspecs import hookimpl
from plait.core.backend_api import Backend


class _OneBackendPlugin:
    def __init__(self, cls: type[Backend]):
        self.cls = cls

    @hookimpl
    def plait_register_backends(self, register: Callable[[type[Backend]], None]) -> None:
        register(self.cls)


@contextlib.contextmanager
def temporarily_registered(cls: type[Backend]) -> Iterator[str]:
    """Register ``cls`` under ``cls.name`` for the duration of the block (a no-op when that
    class is registered already); yields the name."""
    if registry.backend_classes().get(cls.name) is cls:
        yield cls.name
        return
    plugin = _OneBackendPlugin(cls)
    registry.register(plugin, name=f"plait-testing-{cls.name}")
    try:
        yield cls.name
    finally:
        registry.unregister(plugin)
