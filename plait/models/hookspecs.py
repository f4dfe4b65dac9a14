"""The model plugin contract: one hook through which a package registers architectures.

A plugin is a module (or an object) registered under the entry-point group ``plait.models``::

    [project.entry-points."plait.models"]
    my_arch = "my_package.plait_models"

that defines ``plait_register_models`` marked with ``@plait.models.hookspecs.hookimpl``::

    @hookimpl
    def plait_register_models(register):
        register("MyArchForCausalLM", load_my_arch)

The name is a checkpoint's ``config.json`` ``architectures[0]``; the loader is a
:class:`~plait.core.backend_api.ModelLoader`, ``load(spec, device, matmul) -> nn.Module``.
Plait's own architectures register through this hook too (``plait.models.plugin``), and
only the composition root (``plait.compose``) looks them up: the core is handed the loader.
``docs/writing-a-model.md`` walks through one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from plait.core.backend_api import ModelLoader

PROJECT = "plait"
ENTRY_POINT_GROUP = "plait.models"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def plait_register_models(register: Callable[[str, "ModelLoader"], None]) -> None:
    """Call ``register(architecture, loader)`` once for each architecture this plugin
    provides. Called once per process, for every plugin, before any model is loaded:
    register loaders, do not load anything."""
