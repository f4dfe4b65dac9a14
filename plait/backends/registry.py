"""Backend discovery and ``--device`` resolution.

Every backend, the built-in ones included, arrives through the ``plait.backends`` entry-point
group, so a third-party package is found exactly like ours. Plugins are imported lazily, once.
"""
from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import pluggy

from plait.backends import hookspecs
from plait.core.backend_api import BackendInfo


@functools.lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP)
    return pm


def register(plugin: ModuleType | object, name: str | None = None) -> None:
    """Register a backend plugin object directly (tests, notebooks); entry points do this for
    installed packages."""
    pm = plugin_manager()
    if not pm.is_registered(plugin):
        pm.register(plugin, name=name)
    available_backends.cache_clear()


@functools.lru_cache(maxsize=1)
def available_backends() -> dict[str, BackendInfo]:
    """Every registered backend's self-description, keyed by device name."""
    infos: dict[str, BackendInfo] = {}
    for info in plugin_manager().hook.plait_backend_info():
        infos[info.name] = info
    return infos


def resolve_device(device: str) -> str:
    """Map ``auto`` or a device name to a registered, available backend name.

    ``auto`` picks the available backend with the highest priority. An unknown or unavailable
    name is a ``ValueError`` listing every backend and why each unavailable one is so.
    """
    infos = available_backends()
    if device == "auto":
        ready = [i for i in infos.values() if i.available]
        if not ready:
            raise ValueError(f"device='auto': no backend is available.\n{describe_backends()}")
        return max(ready, key=lambda i: i.priority).name
    info = infos.get(device)
    if info is None or not info.available:
        why = "is not a registered backend" if info is None else f"is unavailable: {info.reason}"
        raise ValueError(f"device={device!r} {why}.\n{describe_backends()}")
    return device


def describe_backends() -> str:
    lines = ["Backends (priority order):"]
    for info in sorted(available_backends().values(), key=lambda i: -i.priority):
        state = "available" if info.available else f"unavailable ({info.reason})"
        lines.append(f"  {info.name:<8} {state}")
    return "\n".join(lines)


def call(hook_name: str, device: str, **kwargs: Any) -> Any:
    """Call a firstresult hook for ``device``; the backend answers only for its own name."""
    result = getattr(plugin_manager().hook, hook_name)(device=device, **kwargs)
    if result is None and hook_name != "plait_create_graph_runner":
        raise ValueError(f"backend {device!r} does not implement {hook_name}")
    return result
