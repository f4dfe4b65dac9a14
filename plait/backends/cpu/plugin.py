"""Registers the CPU backend (entry point ``plait.backends: cpu``): the base class's defaults,
the torch reference attention, Linear weights prepacked once (float32 panels or oneDNN), the
native C++ decode step, torch.compile'd decode (opt-in) and the C++ quantized matmul."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch

from plait.backends.hookspecs import hookimpl
from plait.core.backend_api import (
    AttentionBackend,
    Backend,
    GraphRunner,
    KVPool,
    ModelSpec,
    refuse_experts,
    refuse_int8_activations,
)
from plait.backends.cpu.attention import TorchAttentionBackend
from plait.core.model_runner import default_model_runner

if TYPE_CHECKING:
    from plait.core.memory import ReqToTokenPool
    from plait.core.mla import LatentKVPool, MLAAttentionBackend
    from plait.core.model_runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CpuOptions:
    """The CPU backend's switches, given to the instance (``registry.get_backend("cpu",
    options=CpuOptions(...))``, ``plait.Engine(backend_options=...)``). Every False/``"onednn"``
    is the path benchmarks compare against."""

    #: reorder every Linear weight once for oneDNN (``plait.backends.cpu.linear``); False keeps
    #: ``nn.Linear`` on MKL
    prepack_weights: bool = True
    #: the packed form (``plait.backends.cpu.linear.LAYOUTS``): None picks per dtype
    #: (float32 panels where the AVX-512 kernel builds, else oneDNN)
    linear_layout: str | None = None
    #: keep a float32 panel weight's lossless 4-bit form (a checkpoint converted from GGUF
    #: Q4_1; read by products of up to 16 rows) or 16-bit form (one upcast from bfloat16; read
    #: by every product) too, where it has one (``plait.backends.cpu.linear``); False streams
    #: the float32 panels
    compact_weights: bool = True
    #: decode attention over float32 or bfloat16 KV through ``csrc/src/decode_attention.cpp``
    #: (K/V read in place, bf16 widened as it is read); False
    #: keeps the torch gather path
    paged_decode_kernel: bool = True
    #: decode through ``csrc/src/layer_step.cpp`` (all layers in one C++ call,
    #: ``plait.backends.cpu.native_step``) where the model allows and decode is not compiled;
    #: False keeps the eager torch step
    native_decode: bool = True
    #: greedy-only decode batches take their tokens from the bfloat16-screened exact head
    #: (``plait.backends.cpu.greedy_head``) where it applies; False computes the float32 logits
    greedy_head: bool = True


class CpuBackend(Backend):
    name = "cpu"
    priority = 0  # the fallback: every accelerator outranks it
    options_type = CpuOptions
    #: torch.compile of decode takes minutes here: eager unless ``--enable-graph-capture``
    decode_modes = frozenset({"eager", "captured"})
    default_graph_capture = False
    supports_deterministic_inference = True  # plait.backends.cpu.deterministic

    def __init__(self, options: CpuOptions | None = None):
        super().__init__(options)
        self.options: CpuOptions = options or CpuOptions()  # TP ranks get these too

    def free_memory_bytes(self) -> int:
        """What the kernel calls available now: ``MemAvailable`` from /proc/meminfo (free
        pages plus reclaimable page cache, which loading a model's files fills); elsewhere
        than Linux the free pages."""
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def host_thread(self) -> ContextManager[None]:
        """No OpenMP team of its own and one OpenMP thread on the calling thread for the body
        (``plait.backends.cpu.threads``: a second team makes libgomp put the forward thread's
        workers to sleep at every parallel region)."""
        from plait.backends.cpu.threads import one_thread_here

        return one_thread_here()

    def create_attention_backend(
        self, kv_pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int
    ) -> AttentionBackend:
        """Float32 or bfloat16 KV: decode through the in-place paged kernel where it compiles
        (``plait.backends.cpu.paged_decode``); the torch reference otherwise."""
        from plait.backends.cpu.attention import TorchAttentionBackend
        from plait.backends.cpu.paged_decode import PagedDecodeAttentionBackend, kernel_available

        if (
            self.options.paged_decode_kernel
            and kv_pool.dtype in (torch.float32, torch.bfloat16)
            and kernel_available()
        ):
            return PagedDecodeAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim)
        return TorchAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim)

    def create_mla_attention_backend(
        self, kv_pool: "LatentKVPool", num_heads: int, scale: float
    ) -> "MLAAttentionBackend":
        """Multi-head latent attention in torch (``plait.backends.cpu.mla_attention``)."""
        from plait.backends.cpu.mla_attention import TorchMLAAttention

        return TorchMLAAttention(kv_pool, num_heads, scale)

    def quantized_linear(self, method: str, activations: str = "float"):
        """``csrc/src/qmatmul.cpp`` at this CPU's best SIMD level. ``activations="int8"``: its
        AVX-512 VNNI kernel (ValueError on a CPU without VNNI); ``float``: the float-activation
        kernel, or the torch default if it cannot be compiled here (no C++ compiler), with a warning
        since that path is slow."""
        from plait.backends.cpu.cpp_build import has_avx512_vnni
        from plait.backends.cpu.qmatmul import CpuQuantizedMatmul

        if activations == "int8":
            if not has_avx512_vnni():
                raise ValueError(
                    "quantization_activations='int8' needs a CPU with AVX-512 "
                    "VNNI (this one has not)"
                )
            return CpuQuantizedMatmul(int8_activations=True)
        refuse_int8_activations(self.name, activations)
        try:
            return CpuQuantizedMatmul(int8_activations=False)
        except Exception as e:  # a missing compiler surfaces as several error types
            log.warning("quantized CPU kernel unavailable (%s); using the slow torch path", e)
            return super().quantized_linear(method)

    def create_graph_runner(self, model: Any, max_batch_size: int) -> "GraphRunner | None":
        """``torch.compile`` of the decode step over padded batch sizes
        (``plait.backends.cpu.graph``). It compiles the model's ``layers_forward`` through its
        ``decode_forward`` hook (Plait's models have both); any other model decodes eagerly
        (None)."""
        if not (hasattr(model, "layers_forward") and hasattr(model, "decode_forward")):
            return None
        from plait.backends.cpu.graph import CompileCapture
        from plait.core.graph_runner import DecodeGraphRunner

        return DecodeGraphRunner(model, max_batch_size, self.torch_device, CompileCapture(model))

    def create_model_runner(
        self, spec: ModelSpec, kv_pool: KVPool, req_pool: "ReqToTokenPool"
    ) -> "ModelRunner":
        """The default runner, its Linear layers prepacked (``options.prepack_weights``, in
        ``options.linear_layout``), decoding through the native C++ step (``native_decode``,
        where the model allows it) unless decode is compiled (``--enable-graph-capture``)."""
        runner = default_model_runner(self, spec, kv_pool, req_pool)
        opts = self.options
        if opts.prepack_weights or spec.deterministic:
            from plait.backends.cpu.linear import compact_summary, prepack_linears

            layout = opts.linear_layout
            if spec.deterministic:
                layout = _deterministic_layout(layout, spec.dtype, opts.prepack_weights)
            prepack_linears(
                runner.model, layout, opts.compact_weights, _keep_panels(spec.dtype, opts)
            )
            log.info("%s", compact_summary(runner.model))
        if spec.deterministic:
            _make_deterministic(runner, spec)
        elif opts.native_decode and runner.graph_runner is None:
            from plait.backends.cpu.native_step import install_native_decode

            install_native_decode(runner.model, runner.attn, opts.greedy_head)
        return runner


def _keep_panels(dtype: torch.dtype, opts: CpuOptions) -> tuple[str, ...]:
    """The Linears that keep float32 panels beside a 16-bit form: the LM head, for the greedy
    head; a bfloat16 model's only where that head can run here (AVX-512 BF16), so elsewhere its
    weights are all 16-bit (half of float32's memory)."""
    if dtype == torch.bfloat16:
        from plait.backends.cpu.greedy_head import extension

        if not opts.greedy_head or extension() is None:
            return ()
    return ("lm_head",)


def _deterministic_layout(layout: str | None, dtype: torch.dtype, prepack: bool) -> str:
    """The Linear layout of ``--enable-deterministic-inference``: the float32 panels, whose
    product sums each row in k order whatever the row count (oneDNN and MKL pick blockings by
    row count); ValueError where they cannot be had."""
    from plait.backends.cpu.deterministic import FLAG
    from plait.backends.cpu.linear import panel_extension

    if not prepack or layout not in (None, "panel"):
        raise ValueError(
            f"{FLAG} needs the float32 panel Linear layout (prepack_weights=True, "
            f"linear_layout None or 'panel'; got {prepack}, {layout!r})"
        )
    if dtype != torch.float32 or panel_extension() is None:
        raise ValueError(
            f"{FLAG} on the CPU needs dtype float32 and the AVX-512 panel GEMM kernel "
            f"(dtype {dtype}, kernel built here: {panel_extension() is not None})"
        )
    return "panel"


def _make_deterministic(runner: "ModelRunner", spec: ModelSpec) -> None:
    """Every forward through batch-invariant attention, one task per token for prefill and
    decode alike (``plait.backends.cpu.deterministic``); decode stays the eager torch step,
    the same code as extend (the native C++ step fuses its sums differently)."""
    from plait.backends.cpu.deterministic import (
        DeterministicAttentionBackend,
        check_supported,
    )
    from plait.backends.cpu.paged_decode import kernel_available

    old = runner.attn
    if not isinstance(old, TorchAttentionBackend) or not kernel_available():
        raise ValueError(
            "enable_deterministic_inference: the CPU decode-attention kernel is not "
            "available here (a C++ compiler is needed) or the model uses latent attention"
        )
    check_supported(old, spec.dtype)
    refuse_experts(runner.model)
    if runner.graph_runner is not None:
        raise ValueError("enable_deterministic_inference does not support graph capture")
    attn = DeterministicAttentionBackend(old.kv_pool, old.num_heads, old.num_kv_heads, old.head_dim)
    attn.set_sliding_windows(old.sliding_windows)
    attn.set_layer_scales(old.layer_scales)
    attn.set_logit_softcaps(old.logit_softcaps)
    runner.attn = attn


@hookimpl
def plait_register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(CpuBackend)
