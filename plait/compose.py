"""The composition root: the one place that looks up the registries (backends by
``--device``, model architectures by the checkpoint's ``architectures``) and hands the core
what it found. The core imports neither ``plait.models`` nor ``plait.backends.registry``;
it receives a :class:`~plait.core.backend_api.Backend` object and a
:class:`~plait.core.backend_api.ModelLoader` from here.

Used by ``plait.Engine`` when it is built and by each tensor-parallel worker rank, which
repeats the same lookups in its own process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plait.core.backend_api import Backend, ModelLoader


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """A resolved checkpoint: its directory, ``transformers`` config and tokenizer, the
    loader its architecture registered, and the GGUF file it was converted from (if any)."""

    model_dir: Path
    hf_config: Any
    tokenizer: Any
    load_model: "ModelLoader"
    gguf_source: Path | None


def resolve_model_dir(model_path: str | Path | None) -> Path:
    """The directory to load: the default model (fetched on first use) when None, else the
    path itself or the converted cache of a ``.gguf`` file."""
    if model_path is None:
        from plait.models.default import default_model_path

        return default_model_path()
    from plait.models.loader import resolve_model_dir as resolve

    return resolve(model_path)


def get_backend(device: str, options: Any = None) -> "Backend":
    """The backend ``device`` names (or ``auto`` picks), built once with ``options``."""
    from plait.backends import registry

    return registry.get_backend(device, options)


def open_checkpoint(model_dir: Path) -> Checkpoint:
    """Config, tokenizer and the architecture's loader (ValueError naming the architecture
    and every registered one when no plugin provides it)."""
    from plait.models import loader, registry

    hf = loader.load_config(model_dir)
    return Checkpoint(
        model_dir=model_dir,
        hf_config=hf,
        load_model=registry.loader_for(hf),
        tokenizer=loader.load_tokenizer(model_dir),
        gguf_source=loader.gguf_source(model_dir),
    )


def model_loader(hf_config: Any) -> "ModelLoader":
    """The loader ``hf_config``'s architecture registered (a TP worker rank's lookup)."""
    from plait.models import registry

    return registry.loader_for(hf_config)


def load_config(model_dir: Path) -> Any:
    from plait.models.loader import load_config as load

    return load(model_dir)
