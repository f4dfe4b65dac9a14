"""The engine's adapters: the registry of loaded adapters (by name), the pool of device slots,
and the hook the model runner calls around each forward.

Threads: ``load``/``unload`` run on the scheduler thread (the engine routes them there, so
the unload check sees every request the scheduler holds); ``begin``/``end`` on the forward's
thread. One lock orders the pool's slot table between them. A request names its adapter by
name; its prefix-cache namespace is the adapter's ``uid`` (name and load number), so a name
unloaded and loaded again with other weights never meets the old adapter's cached KV.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import torch

from plait.core.forward_batch import ForwardBatch
from plait.lora.adapter import TARGETS, LoraAdapter, load_adapter, parse_lora_paths
from plait.lora.layers import LoraContext, LoraOp, wrap_model
from plait.lora.ops import LoraBatch, apply_grouped
from plait.lora.pool import LoraPool


class LoraManager:
    def __init__(
        self,
        model: torch.nn.Module,
        hf_config: Any,
        *,
        max_loras_per_batch: int,
        max_lora_rank: int,
        target_modules: tuple[str, ...] = TARGETS,
        device: torch.device,
        dtype: torch.dtype,
        op: LoraOp = apply_grouped,
    ):
        self.hf_config = hf_config
        self.device = device
        self.pool = LoraPool(
            hf_config,
            max_loras_per_batch=max_loras_per_batch,
            max_lora_rank=max_lora_rank,
            target_modules=target_modules,
            device=device,
            dtype=dtype,
        )
        self.ctx = LoraContext(self.pool, op)
        wrap_model(model, self.ctx)
        # a backend step that runs the layers itself (the CPU native step) may carry the
        # adapters too; otherwise adapter batches run the eager layers and their wrappers
        attach = getattr(getattr(model, "decode_forward", None), "attach_lora", None)
        self.native_step = bool(attach(self.ctx)) if attach is not None else False
        self.adapters: dict[str, LoraAdapter] = {}
        self.uids: dict[str, str] = {}
        self._counter = itertools.count()
        self._lock = threading.Lock()

    @property
    def max_loras_per_batch(self) -> int:
        return self.pool.num_slots

    # ----- registry (scheduler thread) -----

    def load(self, name: str, path: str) -> LoraAdapter:
        """Read, check and register ``name``; ValueError naming what is wrong (a name in use,
        a rank above ``max_lora_rank``, a module outside ``lora_target_modules``...)."""
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"lora_name must be a non-empty string without ':', got {name!r}")
        if name in self.adapters:
            raise ValueError(f"lora_name {name!r} is already loaded")
        adapter = load_adapter(name, path, self.hf_config)
        self.pool.check(adapter)
        self.adapters[name] = adapter
        self.uids[name] = f"{name}#{next(self._counter)}"
        return adapter

    def load_all(self, lora_paths: list[str] | dict[str, str] | None) -> None:
        for name, path in parse_lora_paths(lora_paths).items():
            self.load(name, path)

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise ValueError(f"lora_name {name!r} is not loaded")
        with self._lock:
            self.pool.evict(name)
        del self.adapters[name]
        del self.uids[name]

    def names(self) -> list[str]:
        return list(self.adapters)

    def uid(self, name: str | None) -> str | None:
        """The prefix-cache namespace of requests on ``name`` (None: the base model)."""
        if name is None:
            return None
        try:
            return self.uids[name]
        except KeyError:
            raise ValueError(
                f"lora_path {name!r} is not a loaded adapter (loaded: {self.names()})"
            ) from None

    def info(self) -> dict[str, Any]:
        return {
            "lora_adapters": {n: a.path for n, a in self.adapters.items()},
            "lora_resident": self.pool.resident(),
            "lora_slot_loads": self.pool.loads,
            "lora_native_step": self.native_step,
        }

    # ----- around a forward (forward thread) -----

    def begin(self, batch: ForwardBatch) -> None:
        """Make the batch's adapters resident and publish its layout to the wrappers."""
        names = batch.lora_ids
        if names is None or all(n is None for n in names):
            self.ctx.batch = None
            return
        distinct = list(dict.fromkeys(n for n in names if n is not None))
        with self._lock:
            missing = [n for n in distinct if n not in self.adapters]
            if missing:
                raise ValueError(f"lora_path {missing[0]!r} is not a loaded adapter")
            slots = self.pool.activate([self.adapters[n] for n in distinct])
        self.ctx.batch = LoraBatch.build(
            [None if n is None else slots[n] for n in names],
            batch.extend_lens_cpu,
            self.pool.scaling.tolist(),
            self.device,
        )

    def end(self) -> None:
        self.ctx.batch = None


def build_lora_manager(
    model: torch.nn.Module,
    hf_config: Any,
    *,
    lora_paths: list[str] | dict[str, str] | None,
    max_loras_per_batch: int,
    max_lora_rank: int | None,
    lora_target_modules: list[str] | None,
    device: torch.device,
    dtype: torch.dtype,
    op: LoraOp = apply_grouped,
) -> LoraManager:
    """A manager with ``lora_paths`` loaded. Unset limits come from those adapters, as
    SGLang's: ``max_lora_rank`` their largest rank, ``lora_target_modules`` the union of
    their targets (every supported module when none is given)."""
    import json
    from pathlib import Path

    paths = parse_lora_paths(lora_paths)
    configs = []
    for name, path in paths.items():
        cfg_file = Path(path) / "adapter_config.json"
        if not cfg_file.is_file():
            raise ValueError(f"lora adapter {name!r} ({path}): adapter_config.json not found")
        configs.append(json.loads(cfg_file.read_text()))
    if max_lora_rank is None:
        ranks = [c.get("r") for c in configs if isinstance(c.get("r"), int)]
        if not ranks:
            raise ValueError("max_lora_rank is needed when no lora_paths are given")
        max_lora_rank = max(ranks)
    targets: tuple[str, ...]
    if lora_target_modules and "all" not in lora_target_modules:
        targets = tuple(lora_target_modules)
    elif lora_target_modules or not configs:
        targets = TARGETS
    else:
        union = {t for c in configs for t in (c.get("target_modules") or ())}
        targets = tuple(t for t in TARGETS if t in union) or TARGETS
    manager = LoraManager(
        model,
        hf_config,
        max_loras_per_batch=max_loras_per_batch,
        max_lora_rank=max_lora_rank,
        target_modules=targets,
        device=device,
        dtype=dtype,
        op=op,
    )
    manager.load_all(paths)
    return manager
