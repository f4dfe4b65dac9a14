"""The backend conformance kit: what any backend, built-in or third party, must pass.

* :class:`BackendConformance` - a pytest class to subclass with ``device = "name"``;
* :mod:`plait.testing.kit` - the checks as plain functions over a
  :class:`~plait.core.backend_api.Backend` object;
* :func:`temporarily_registered` - register a Backend class for the length of a block;
* :mod:`plait.testing.cases` - the attention shape grid (``quick`` and ``full``);
* :mod:`plait.testing.tiny_model` - a tiny random Llama checkpoint for end-to-end runs;
* :mod:`plait.testing.plugin` - ``--plait-device`` / ``--plait-kit-grid`` options.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BackendConformance", "make_tiny_llama", "temporarily_registered"]


def __getattr__(name: str) -> Any:
    # Lazy, so importing plait.testing.kit does not import pytest.
    if name == "BackendConformance":
        from plait.testing.conformance import BackendConformance

        return BackendConformance
    if name == "temporarily_registered":
        from plait.testing.register import temporarily_registered

        return temporarily_registered
    if name == "make_tiny_llama":
        from plait.testing.tiny_model import make_tiny_llama

        return make_tiny_llama
    raise AttributeError(name)
