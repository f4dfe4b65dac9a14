"""The plugin contract: one hook through which a package registers its :class:`Backend` classes.

A plugin is a module (or an object) registered under the entry-point group ``plait.backends``::

    [project.entry-points."plait.backends"]
    mydevice = "my_package.plait_plugin"

that defines ``plait_register_backends`` marked with ``@plait.backends.hookimpl``::

    @hookimpl
    def plait_register_backends(register):
        register(MyDeviceBackend)

Everything a device provides is a method of its :class:`~plait.core.backend_api.Backend`
subclass; ``docs/writing-a-backend.md`` walks through one. Keep the plugin module cheap to
import: device libraries belong in the methods that run once the backend is chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from plait.core.backend_api import Backend

PROJECT = "plait"
ENTRY_POINT_GROUP = "plait.backends"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def plait_register_backends(register: Callable[[type["Backend"]], None]) -> None:
    """Call ``register(cls)`` once for each :class:`~plait.core.backend_api.Backend` subclass
    this plugin provides. Called once per process, for every plugin, before any device is
    chosen: register classes, do not instantiate them."""
