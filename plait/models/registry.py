"""Model discovery: every architecture, Plait's included, arrives through the ``plait.models``
entry-point group, so a third-party package's is found exactly like ours. Only the
composition root (``plait.compose``) asks this module; the core is handed the loader."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from plait.models import hookspecs

if TYPE_CHECKING:
    from plait.core.backend_api import ModelLoader


@functools.lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP)
    return pm


def register(plugin: ModuleType | object, name: str | None = None) -> None:
    """Register a plugin (anything with a ``plait_register_models`` hookimpl) directly, for
    tests and notebooks; entry points do this for installed packages."""
    pm = plugin_manager()
    if not pm.is_registered(plugin):
        pm.register(plugin, name=name)
    model_loaders.cache_clear()


def unregister(plugin: ModuleType | object) -> None:
    plugin_manager().unregister(plugin)
    model_loaders.cache_clear()


@functools.lru_cache(maxsize=1)
def model_loaders() -> dict[str, "ModelLoader"]:
    """Every registered architecture's loader, keyed by architecture name. Two plugins
    claiming one name is a ValueError naming both (the winner would depend on install
    order)."""
    loaders: dict[str, ModelLoader] = {}

    def add(architecture: str, loader: "ModelLoader") -> None:
        if not isinstance(architecture, str) or not architecture or not callable(loader):
            raise ValueError(
                f"register() takes an architecture name and a loader, got "
                f"{architecture!r}, {loader!r}"
            )
        other = loaders.get(architecture)
        if other is not None and other is not loader:
            raise ValueError(
                f"architecture {architecture!r} is registered twice: by "
                f"{_where(other)} and {_where(loader)}"
            )
        loaders[architecture] = loader

    plugin_manager().hook.plait_register_models(register=add)
    return loaders


def loader_for(hf_config: Any) -> "ModelLoader":
    """The loader of the checkpoint's ``architectures[0]``; ValueError naming it and every
    registered architecture when no plugin provides it."""
    names = getattr(hf_config, "architectures", None) or []
    loaders = model_loaders()
    if names and names[0] in loaders:
        return loaders[names[0]]
    what = f"architecture {names[0]!r}" if names else "a config.json without `architectures`"
    raise ValueError(
        f"{what} is not supported (model_type {hf_config.model_type!r}); "
        f"registered architectures: {sorted(loaders)}"
    )


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
