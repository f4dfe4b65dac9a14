"""Registers the Ascend NPU backend (entry point ``plait.backends: npu``).

Detection must work, and say why, on machines without torch_npu: it looks the module up
without importing it, and imports it only when it is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

import torch

from plait.backends.hookspecs import hookimpl
from plait.core.backend_api import AttentionBackend, Backend, KVPool


class NpuBackend(Backend):
    """torch-npu's fused attention (FIA) over the paged pool.

    The defaults are what FIA's paged mode accepts (see ``npu/attention.py``): a half dtype and
    a block size that is a multiple of 16; 128 is the block size Ascend's paged attention is
    commonly run with (vLLM-Ascend's default). An explicit fp32 or page size 1 still works, on
    the slower torch reference.

    Decode runs eagerly (the default ``create_graph_runner`` and ``decode_modes``, so
    ``--enable-graph-capture`` is refused): FIA takes sequence lengths as host lists, which a
    captured NPU graph would freeze at capture time (updating them needs torch_npu's graph
    task-update API).
    """

    name = "npu"
    priority = 70
    default_dtype = "bfloat16"
    default_page_size = 128
    distributed_backend = "hccl"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("torch_npu") is None:
            return "torch_npu not installed"
        try:
            importlib.import_module("torch_npu")  # registers torch.npu
        except Exception as e:  # a broken CANN install raises all sorts of errors
            return f"torch_npu failed to import: {e}"
        npu = getattr(torch, "npu", None)
        if npu is None or not npu.is_available():
            return "no Ascend NPU visible to torch_npu"
        return None

    @property
    def torch_device(self) -> torch.device:
        importlib.import_module("torch_npu")  # the "npu" device type exists once it is imported
        return torch.device("npu")

    def create_attention_backend(
        self, kv_pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int
    ) -> AttentionBackend:
        from plait.backends.npu.attention import AscendAttentionBackend

        return AscendAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim)


@hookimpl
def plait_register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(NpuBackend)
