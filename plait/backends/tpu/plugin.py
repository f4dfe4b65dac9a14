"""Registers the TPU backend (entry point ``plait.backends: tpu``).

The whole forward runs in JAX on the TPU (:mod:`.model_runner`): weights as ``jax.Array``s,
the paged KV pool as device arrays updated with donated buffers, attention through the Pallas
paged kernels, one ``jax.jit`` program per padded bucket (:mod:`.graph`). Only the step's
int32 inputs go to the device and its logits come back. ``PLAIT_TPU_PLATFORM=cpu`` runs the
same code on JAX's CPU device (development mode, see :mod:`.platform`).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, ClassVar

from plait.backends.hookspecs import hookimpl
from plait.backends.tpu import platform
from plait.core.backend_api import AttentionBackend, Backend, KVPool, ModelSpec


class TpuBackend(Backend):
    name = "tpu"
    priority = 80
    #: decode/extend batch buckets the runner pads to (the engine's max batch is added)
    jit_batch_sizes: ClassVar[tuple[int, ...]] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    #: the smallest token and kv-width buckets (powers of two above them up to the limits)
    jit_min_tokens: ClassVar[int] = 16
    jit_min_kv_width: ClassVar[int] = 128
    #: every step is a ``jax.jit`` program (:mod:`.graph`): there is no eager path to
    #: ``--disable-graph-capture`` into; ``--enable-graph-capture`` asks for what always happens
    decode_modes = frozenset({"captured"})
    default_graph_capture = True
    #: the runner is JAX's own (one device), not the core ModelRunner the ranks shard
    supports_tensor_parallel = False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("jax") is None:
            return "jax not installed (pip install plait[tpu])"
        try:
            if platform.requested_platform() == "cpu":
                return None  # development mode: jax's CPU device is always there
        except ValueError as e:
            return str(e)
        if importlib.util.find_spec("libtpu") is None:
            # Without libtpu jax cannot reach a TPU; answering here avoids importing jax.
            return (
                f"no TPU runtime (libtpu not installed; {platform.PLATFORM_ENV}=cpu runs "
                "the backend on jax's CPU device for development)"
            )
        try:
            import jax

            jax.devices("tpu")
        except RuntimeError as e:
            return f"jax sees no TPU ({e})"
        return None

    def jax_device(self) -> Any:
        """Where the weights, the KV pool and every step live."""
        return platform.jax_device(platform.requested_platform())

    def attention_impl(self) -> str:
        """``pallas`` or ``jax`` (see :mod:`.platform`)."""
        return platform.requested_attention(self.jax_device().platform)

    def create_kv_pool(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: Any,
        page_size: int,
    ) -> KVPool:
        from plait.backends.tpu.attention import JaxKVPool

        return JaxKVPool(
            num_slots, num_layers, num_kv_heads, head_dim, dtype, page_size, self.jax_device()
        )

    def create_attention_backend(
        self, kv_pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int
    ) -> AttentionBackend:
        """The Pallas kernels behind the core's torch attention contract: not on the engine's
        path (the JAX runner calls the kernels inside its jitted step), kept so the
        conformance kit certifies the kernels against the CPU reference."""
        from plait.backends.tpu.attention import PallasAttentionBackend

        return PallasAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim)

    def create_model_runner(self, spec: ModelSpec, kv_pool: KVPool, req_pool: Any) -> Any:
        from plait.backends.tpu.attention import JAX_DTYPES, JaxKVPool
        from plait.backends.tpu.graph import JitBuckets
        from plait.backends.tpu.jax_llama import LlamaShape
        from plait.backends.tpu.model_runner import JaxModelRunner
        from plait.backends.tpu.weights import load_params

        if spec.quantization.method != "none":  # the JAX model has no quantized layers
            raise ValueError(
                f"quantization={spec.quantization.method!r} is not supported by "
                f"the {self.name!r} backend (only 'none')"
            )
        arch = (getattr(spec.hf_config, "architectures", None) or ["?"])[0]
        if arch not in JAX_ARCHITECTURES:  # its JAX model is Llama's: no q/k norms, no Gemma
            raise ValueError(
                f"architecture {arch!r} is not supported by the {self.name!r} backend "
                f"(its JAX model serves {', '.join(JAX_ARCHITECTURES)})"
            )
        if not isinstance(kv_pool, JaxKVPool):
            raise ValueError(f"kv_pool must be a JaxKVPool, got {type(kv_pool).__name__}")
        params = load_params(
            spec.model_dir,
            spec.hf_config,
            JAX_DTYPES[spec.dtype],
            kv_pool.jax_device,
            spec.context_len,
        )
        buckets = JitBuckets.build(
            spec.max_batch_size,
            kv_pool.num_slots,
            spec.context_len,
            self.jit_batch_sizes,
            self.jit_min_tokens,
            max(self.jit_min_kv_width, kv_pool.page_size),
        )
        return JaxModelRunner(
            params,
            LlamaShape.of(spec.hf_config, spec.context_len),
            kv_pool,
            req_pool,
            buckets,
            self.attention_impl(),
        )


#: the checkpoints the JAX Llama computes exactly
JAX_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@hookimpl
def plait_register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(TpuBackend)
