"""Where the TPU backend runs: a real TPU, or JAX's CPU device in development mode.

``PLAIT_TPU_PLATFORM=cpu`` is the development mode: the ``tpu`` backend reports itself available
without libtpu and places the model, the KV pool and every jitted step on ``jax.devices("cpu")``,
with Pallas kernels interpreted. It runs the same JAX code a TPU would, so CI exercises it; it
says nothing about TPU speed. Unset (or ``tpu``), the backend needs libtpu and a visible TPU.

``PLAIT_TPU_ATTENTION`` picks the attention inside the jitted step: ``pallas`` (the paged
kernels in :mod:`.pallas_attention`; interpreted off-TPU) or ``jax`` (plain XLA gathers and a
masked softmax, fast on a CPU). Unset: ``pallas`` on a TPU, ``jax`` in development mode.

Reading these variables never imports jax (detection must stay cheap).
"""

from __future__ import annotations

import os
from typing import Any

PLATFORM_ENV = "PLAIT_TPU_PLATFORM"
ATTENTION_ENV = "PLAIT_TPU_ATTENTION"
PLATFORMS = ("tpu", "cpu")
ATTENTIONS = ("pallas", "jax")


def requested_platform() -> str:
    """``tpu`` (default) or ``cpu``; ValueError naming the variable for anything else."""
    value = os.environ.get(PLATFORM_ENV, "").strip().lower() or "tpu"
    if value not in PLATFORMS:
        raise ValueError(f"{PLATFORM_ENV} must be one of {PLATFORMS}, got {value!r}")
    return value


def requested_attention(platform: str) -> str:
    """The attention implementation for ``platform`` (see the module docstring)."""
    value = os.environ.get(ATTENTION_ENV, "").strip().lower()
    if not value:
        return "pallas" if platform == "tpu" else "jax"
    if value not in ATTENTIONS:
        raise ValueError(f"{ATTENTION_ENV} must be one of {ATTENTIONS}, got {value!r}")
    return value


def jax_device(platform: str) -> Any:
    """The first jax device of ``platform`` (imports jax)."""
    import jax

    return jax.devices(platform)[0]
