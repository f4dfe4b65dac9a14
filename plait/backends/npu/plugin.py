"""Registers the Ascend NPU backend (entry point ``plait.backends: npu``).

Detection must work, and say why, on machines without torch_npu: it looks the module up
without importing it, and imports it only when it is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from plait.backends.hookspecs import hookimpl
from plait.core.backend_api import AttentionBackend, Backend, KVPool, ModelSpec
from plait.core.model_runner import default_model_runner

if TYPE_CHECKING:
    from plait.core.kv_layout import KVCacheLayout
    from plait.core.memory import ReqToTokenPool
    from plait.core.mla import LatentKVPool, MLAAttentionBackend
    from plait.core.model_runner import ModelRunner


@dataclass(frozen=True, kw_only=True)
class NpuOptions:
    """The NPU backend's switches (``plait.Engine(device="npu", backend_options=...)``)."""

    #: cast every Linear weight to the fractal NZ layout at load (``plait.backends.npu.nz``;
    #: vLLM-Ascend's ``VLLM_ASCEND_ENABLE_NZ``, on by default there too); False keeps ND
    enable_nz: bool = True


class NpuBackend(Backend):
    """torch-npu's fused attention (FIA) over the paged pool; for MLA models (DeepSeek) FIA's
    MLA mode (decode, short extends) over a split latent pool (``npu/mla_attention.py``);
    Linear weights in the fractal NZ layout (``npu/nz.py``). Never run on Ascend hardware (docs/npu-backend.md).

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
    options_type = NpuOptions
    default_dtype = "bfloat16"
    default_page_size = 128
    distributed_backend = "hccl"

    def __init__(self, options: Any = None):
        super().__init__(options)
        self.options: NpuOptions = options if options is not None else NpuOptions()

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

        return AscendAttentionBackend(
            kv_pool, num_heads, num_kv_heads, head_dim, torch_npu=self.torch_npu_module()
        )

    def create_latent_kv_pool(
        self, *, layout: "KVCacheLayout", num_slots: int, dtype: torch.dtype, page_size: int
    ) -> "LatentKVPool":
        """The latent and its RoPE key in separate buffers, as FIA's MLA mode reads them."""
        from plait.backends.npu.mla_attention import SplitLatentKVPool

        return SplitLatentKVPool(layout, num_slots, dtype, self.torch_device, page_size)

    def create_mla_attention_backend(
        self, kv_pool: "LatentKVPool", num_heads: int, scale: float
    ) -> "MLAAttentionBackend":
        """FIA's MLA mode where it applies (``npu/mla_attention.py``)."""
        from plait.backends.npu.mla_attention import AscendMLAAttention, SplitLatentKVPool

        if not isinstance(kv_pool, SplitLatentKVPool):
            raise TypeError("the NPU's MLA attention reads the pool create_latent_kv_pool makes")
        return AscendMLAAttention(kv_pool, num_heads, scale, torch_npu=self.torch_npu_module())

    def create_model_runner(
        self, spec: ModelSpec, kv_pool: KVPool, req_pool: "ReqToTokenPool"
    ) -> "ModelRunner":
        """The core's runner, its Linear weights cast to fractal NZ (``options.enable_nz``)."""
        from plait.backends.npu.nz import cast_linear_weights_to_nz

        runner = default_model_runner(self, spec, kv_pool, req_pool)
        if self.options.enable_nz:
            cast_linear_weights_to_nz(runner.model, self.torch_npu_module())
        return runner

    def torch_npu_module(self) -> Any | None:
        """torch_npu, or None where it cannot be imported (the ops' users then import it
        themselves and fail naming it; the NZ cast is skipped). Tests on CPU override this
        with a stand-in of the ops."""
        from plait.backends.npu.nz import import_torch_npu

        return import_torch_npu()


@hookimpl
def plait_register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(NpuBackend)
