"""Reading a checkpoint directory's safetensors files, the one way every loader does it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import safe_open


def checkpoint_entries(model_dir: Path | str) -> Iterator[tuple[str, Any]]:
    """Each tensor name in ``model_dir``'s ``*.safetensors`` files (in file order) with the open
    file that holds it, for ``get_tensor(name)`` or ``get_slice(name)`` (a rank reads only its
    shard). ValueError when the directory has no safetensors file."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {str(model_dir)!r}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f
