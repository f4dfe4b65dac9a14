"""LoRA adapters on the CPU backend's native step: the adapter pool's buffers handed to the
C++ ``DecodeModel`` once, and each forward's per-row adapter slots set around the call.

Why: without this, any batch with an adapter left the native step for the eager layers
(``LoraLinear`` wrappers), a slower path for the whole batch, base-model rows included;
``benchmarks.offline --compare plait lora8`` measured 0.28x the base model at batch 16.

What holds:
- The C++ step reads the pool's ``A``/``BT`` buffers in place (``plait.lora.pool``'s layout), so
  an adapter loaded into a slot later is seen without re-registering; the pool copies adapters
  in between forwards, on the forward's thread, so a slot never changes under a step.
- Each row's delta is its own adapter's, after the projection it wraps, in peft's order
  (``csrc/src/lora_delta.cpp``); base-model rows (slot -1) are untouched.
- Only a float32 pool on the CPU is attached; otherwise the model keeps running adapter
  batches through the eager layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: wrapped projection (``plait.lora.pool.GROUPS``) -> the C++ ``LoraTarget`` index
TARGETS = {"qkv_proj": 0, "o_proj": 1, "gate_up_proj": 2, "down_proj": 3}


class NativeLora:
    """The adapters of one native step (shared by its decode and extend callables)."""

    def __init__(self, step: Any):
        self.step = step
        self.ctx: Any = None  # plait.lora.layers.LoraContext, once attached

    @property
    def attached(self) -> bool:
        return self.ctx is not None

    def attach(self, ctx: Any) -> bool:
        """Register ``ctx``'s pool buffers with the step; False (nothing registered) where the
        pool is not float32 on the CPU."""
        pool = ctx.pool
        if pool.dtype != torch.float32 or pool.device.type != "cpu":
            return False
        if set(pool.groups) - set(TARGETS):
            return False
        for layer, (a_layer, bt_layer) in enumerate(zip(pool.a, pool.bt)):
            for group, a in a_layer.items():
                self.step.set_layer_lora(layer, TARGETS[group], a, bt_layer[group])
        self.ctx = ctx
        return True

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The current forward's adapters set on the step for the duration (none: a no-op)."""
        batch = None if self.ctx is None else self.ctx.batch
        if batch is None:
            yield
            return
        self.step.set_lora(batch.row_slots, self.ctx.pool.scaling)
        try:
            yield
        finally:
            self.step.clear_lora()
