"""What the offline and served peers share: choosing engines by name, a peer's thread settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def pick_named(text: str, table: Mapping[str, T], flag: str) -> list[T]:
    """The entries of ``table`` that ``text`` names, in its order; a ValueError naming ``flag``
    and the choices for an unknown name or an empty list."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise ValueError(f"{flag}: unknown {unknown or 'empty list'}; choose from {list(table)}")
    return [table[n] for n in names]


def thread_env(threads: int, **extra: str) -> dict[str, str]:
    """This process's environment with every thread pool of a peer set to ``threads`` (OpenMP,
    MKL; tokenizers' pool off), plus ``extra``."""
    return dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )
