"""Hardware backends, discovered through pluggy entry points (group ``plait.backends``)."""

from plait.backends.hookspecs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec"]
