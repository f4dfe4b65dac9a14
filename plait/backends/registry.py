"""Backend discovery and ``--device`` resolution.

Every backend, the built-in ones included, arrives through the ``plait.backends`` entry-point
group, so a third-party package is found exactly like ours. Plugins are imported lazily, once;
``info()`` is asked of every registered class, and only the class ``--device`` names is
instantiated (:func:`get_backend`), so only its device library is ever imported.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import pluggy

from plait.backends import hookspecs
from plait.core.backend_api import Backend, BackendInfo


@functools.lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP)
    return pm


def register(plugin: ModuleType | object, name: str | None = None) -> None:
    """Register a plugin (anything with a ``plait_register_backends`` hookimpl) directly, for
    tests and notebooks; entry points do this for installed packages."""
    pm = plugin_manager()
    if not pm.is_registered(plugin):
        pm.register(plugin, name=name)
    _forget()


def unregister(plugin: ModuleType | object) -> None:
    plugin_manager().unregister(plugin)
    _forget()


def _forget() -> None:
    backend_classes.cache_clear()
    available_backends.cache_clear()


@functools.lru_cache(maxsize=1)
def backend_classes() -> dict[str, type[Backend]]:
    """Every registered Backend class, keyed by device name. Two classes claiming one name is
    a ``ValueError`` naming both (which one wins would otherwise depend on install order)."""
    classes: dict[str, type[Backend]] = {}

    def add(cls: type[Backend]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise ValueError(f"register() takes a plait Backend subclass, got {cls!r}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"backend class {cls.__qualname__} must set a non-empty `name`")
        other = classes.get(name)
        if other is not None and other is not cls:
            raise ValueError(
                f"backend name {name!r} is registered twice: by "
                f"{other.__module__}.{other.__qualname__} and "
                f"{cls.__module__}.{cls.__qualname__}"
            )
        classes[name] = cls

    plugin_manager().hook.plait_register_backends(register=add)
    return classes


@functools.lru_cache(maxsize=1)
def available_backends() -> dict[str, BackendInfo]:
    """Every registered backend's self-description, keyed by device name."""
    return {name: cls.info() for name, cls in backend_classes().items()}


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


def get_backend(device: str, options: Any = None) -> Backend:
    """The backend object for ``device`` (a name or ``auto``): resolved once, instantiated
    once with ``options`` (its ``options_type``, a dict of that type's fields, or None for
    the defaults). This is the only place a device's own code starts to run."""
    cls = backend_classes()[resolve_device(device)]
    if isinstance(options, dict):
        if cls.options_type is None:
            raise ValueError(
                f"backend_options: the {cls.name!r} backend has no options, got {sorted(options)}"
            )
        try:
            options = cls.options_type(**options)
        except TypeError as e:
            raise ValueError(f"backend_options for the {cls.name!r} backend: {e}") from None
    return cls(options)


def describe_backends() -> str:
    lines = ["Backends (priority order):"]
    for info in sorted(available_backends().values(), key=lambda i: -i.priority):
        state = "available" if info.available else f"unavailable ({info.reason})"
        lines.append(f"  {info.name:<8} {state}")
    return "\n".join(lines)
