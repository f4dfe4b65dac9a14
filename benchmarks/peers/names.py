"""Choosing engines by name from a comma-separated flag, shared by the offline and served peers."""

from __future__ import annotations

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
