"""The adapter memory pool: every loaded adapter on the host, at most ``max_loras_per_batch`` of
them in device slots, least recently used evicted (to the host copy it always keeps).

Layout. Each wrapped projection group of each layer (``qkv``, ``o``, ``gate_up``, ``down``: see
:data:`GROUPS`) has one buffer pair over all slots:

- ``A [slots + 1, k * R, in]``: the group's k sub-modules' ``lora_A`` stacked, each padded
  with zero rows to ``R = max_lora_rank``;
- ``B [slots + 1, out, k * R]``: block diagonal, sub-module j's ``lora_B`` in rows
  ``offset_j .. offset_j + out_j`` and columns ``j*R .. j*R + r``, zero elsewhere.

so one shrink (``x @ A.T``) and one expand (``h @ B.T``) give the fused output's delta, each
slice from its own module. ``BT [slots + 1, k * R, out]`` holds each slot's ``B`` transposed,
written with it: the CPU native step's expand reads it row by row (``csrc/src/lora_delta.cpp``). The zero padding adds exact zeros. The last slot (``base_slot``)
stays all zero: tokens of the base model may share a gathered product and get a zero delta.

What holds: a slot holds at most one adapter; ``activate(names)`` returns a slot per name with
every named adapter resident, and evicts only adapters not named (a batch never has more
distinct adapters than slots: the scheduler admits at most ``max_loras_per_batch``).
Adapters are copied in on the forward's own thread, between forwards, so a slot never changes
under a running batch.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from plait.lora.adapter import TARGETS, LoraAdapter, module_shapes

#: wrapped projection -> its sub-modules in fused order (Plait's Llama layout)
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


class LoraPool:
    def __init__(
        self,
        hf_config: Any,
        *,
        max_loras_per_batch: int,
        max_lora_rank: int,
        target_modules: tuple[str, ...],
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.num_slots = max_loras_per_batch
        self.base_slot = max_loras_per_batch
        self.rank = max_lora_rank
        self.targets = tuple(t for t in TARGETS if t in target_modules)
        self.device, self.dtype = device, dtype
        self.shapes = module_shapes(hf_config)
        #: wrapped group -> its sub-modules that an adapter may target
        self.groups = {
            g: subs for g, subs in GROUPS.items() if any(s in self.targets for s in subs)
        }
        n = self.num_slots + 1
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        self.bt: list[dict[str, torch.Tensor]] = []
        for _ in range(hf_config.num_hidden_layers):
            a_l, b_l, bt_l = {}, {}, {}
            for g, subs in self.groups.items():
                n_in = self.shapes[subs[0]][0]
                n_out = sum(self.shapes[s][1] for s in subs)
                k = len(subs) * self.rank
                a_l[g] = torch.zeros(n, k, n_in, device=device, dtype=dtype)
                b_l[g] = torch.zeros(n, n_out, k, device=device, dtype=dtype)
                bt_l[g] = torch.zeros(n, k, n_out, device=device, dtype=dtype)
            self.a.append(a_l)
            self.b.append(b_l)
            self.bt.append(bt_l)
        self.scaling = torch.zeros(n, device=device, dtype=dtype)
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # resident, LRU first
        self.loads = 0  # adapters copied into a slot, for metrics and tests

    def check(self, adapter: LoraAdapter) -> None:
        """ValueError naming the limit an adapter breaks (before it is registered)."""
        if adapter.rank > self.rank:
            raise ValueError(
                f"lora adapter {adapter.name!r} has rank {adapter.rank}, above "
                f"max_lora_rank={self.rank}"
            )
        extra = sorted(set(adapter.config.target_modules) - set(self.targets))
        if extra:
            raise ValueError(
                f"lora adapter {adapter.name!r} targets {extra}, outside "
                f"lora_target_modules={list(self.targets)}"
            )

    def resident(self) -> list[str]:
        return list(self._slot_of)

    def activate(self, adapters: list[LoraAdapter]) -> dict[str, int]:
        """Slots for ``adapters`` (distinct, at most ``num_slots``), loading the missing ones
        over the least recently used adapters not among them."""
        if len(adapters) > self.num_slots:
            raise ValueError(
                f"a batch uses {len(adapters)} adapters; max_loras_per_batch={self.num_slots}"
            )
        wanted = {a.name for a in adapters}
        for ad in adapters:
            if ad.name in self._slot_of:
                self._slot_of.move_to_end(ad.name)
                continue
            used = set(self._slot_of.values())
            free = [s for s in range(self.num_slots) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next(n for n in self._slot_of if n not in wanted)
                slot = self._slot_of.pop(victim)
            self._write(slot, ad)
            self._slot_of[ad.name] = slot
        return {a.name: self._slot_of[a.name] for a in adapters}

    def evict(self, name: str) -> None:
        """Drop ``name`` from its slot (unloaded: its slot is free for the next one)."""
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            self._clear(slot)

    def _clear(self, slot: int) -> None:
        for a_l, b_l, bt_l in zip(self.a, self.b, self.bt):
            for g in self.groups:
                a_l[g][slot].zero_()
                b_l[g][slot].zero_()
                bt_l[g][slot].zero_()
        self.scaling[slot] = 0

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        self._clear(slot)
        r, big_r = adapter.rank, self.rank
        for layer, (a_l, b_l) in enumerate(zip(self.a, self.b)):
            for g, subs in self.groups.items():
                row = 0
                for j, sub in enumerate(subs):
                    n_out = self.shapes[sub][1]
                    ab = adapter.weights.get((layer, sub))
                    if ab is not None:
                        a, b = ab
                        a_l[g][slot, j * big_r : j * big_r + r] = a.to(self.device, self.dtype)
                        b_l[g][slot, row : row + n_out, j * big_r : j * big_r + r] = b.to(
                            self.device, self.dtype
                        )
                    row += n_out
                self.bt[layer][g][slot].copy_(b_l[g][slot].T)
        self.scaling[slot] = adapter.scaling
        self.loads += 1
