"""What the core expects from a backend, as plain Python types.

A device is one :class:`Backend` subclass: the registry calls ``info()`` on every registered
class (cheap: no device library is imported), instantiates the one ``--device`` names, and the
engine asks that object for its pieces. The core builds a
:class:`~plait.core.forward_batch.ForwardBatch` and hands it, with q/k/v, to an
:class:`AttentionBackend`; everything device-specific lives behind these classes.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, Protocol

import torch

from plait.core.attention_api import AttentionBackend, KVPool, describe_windows
from plait.core.pp.stage import PPStage
from plait.core.tp.group import TPGroup
from plait.quant import QuantConfig

__all__ = [
    "AttentionBackend",
    "Backend",
    "BackendInfo",
    "GraphRunner",
    "KVPool",
    "ModelLoader",
    "ModelSpec",
    "StepRunner",
    "describe_windows",
    "refuse_int8_activations",
]

if TYPE_CHECKING:
    from plait.core.forward_batch import ExtendItem, ForwardBatch, GreedyTokens
    from plait.core.kv_layout import KVCacheLayout
    from plait.core.memory import ReqToTokenPool, TokenSlotAllocator
    from plait.core.mla import LatentKVPool, MLAAttentionBackend
    from plait.core.request import Req
    from plait.ops.fused_moe import FusedExperts
    from plait.quant.modules import QuantizedMatmul


@dataclass(frozen=True, kw_only=True)
class BackendInfo:
    """A backend's self-description; ``priority`` orders ``--device auto`` (higher wins)."""

    name: str
    priority: int
    available: bool
    reason: str = ""  # why not available (empty when available)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What :meth:`Backend.create_model_runner` needs to build the forward pass.

    ``hf_config`` is the checkpoint's ``transformers`` config; ``context_len`` the longest
    sequence the runner must serve; ``max_batch_size`` the most requests in one decode;
    ``graph_capture`` whether decode may be captured (False: ``--disable-graph-capture``, or a
    backend whose default is eager and no ``--enable-graph-capture``).
    ``tp`` is the tensor-parallel rank the runner is for: with ``tp.size > 1`` it holds only
    that rank's shard of the model (and its ``kv_pool`` only that shard's KV heads).
    ``quantization`` is how the Linear layers are stored (see :mod:`plait.quant`).
    """

    model_dir: Path
    hf_config: Any
    dtype: torch.dtype
    context_len: int
    max_batch_size: int
    graph_capture: bool = True
    tp: TPGroup = TPGroup()
    #: the pipeline stage the runner is for (``plait.core.pp``): with ``pp.size > 1`` the model
    #: holds only that stage's decoder layers (and its ``kv_pool`` only their KV)
    pp: PPStage = PPStage()
    quantization: QuantConfig = QuantConfig()
    #: builds the torch model (this rank's shard, its weights loaded): handed in by the
    #: composition root from the model registry, so the core never imports ``plait.models``.
    #: None: no torch model is available (a backend with its own runner reads ``model_dir``)
    load_model: "ModelLoader | None" = None
    #: the backend's fused-experts op (:meth:`Backend.fused_moe`) for a MoE model's sparse
    #: layers: set by :func:`~plait.core.model_runner.default_model_runner` before it calls
    #: ``load_model``; None: the loader uses the portable torch op
    fused_moe: "FusedExperts | None" = None
    #: ``--enable-deterministic-inference``: every row's logits must not depend on the rest of
    #: its batch, its chunking or its phase (docs/deterministic.md); only a backend with
    #: ``supports_deterministic_inference`` is given True
    deterministic: bool = False


class ModelLoader(Protocol):
    """Builds the forward module for ``spec`` on ``device``: ``model(batch, attn)`` returns
    logits (or :class:`~plait.core.forward_batch.GreedyTokens`), ``model.sliding_windows``
    holds each layer's window, and ``model.layers[0].self_attn`` has ``num_heads`` and
    ``num_kv_heads`` (this rank's). ``matmul`` runs the quantized Linear layers (None when
    ``spec.quantization.method`` is ``"none"``).

    A loader may also declare its KV cache layout with a ``kv_layout(hf_config, tp_size,
    tp_rank) -> KVCacheLayout`` attribute (``plait.core.kv_layout``); without one the pool
    holds K and V per KV head. A latent layout's model has ``layers[0].self_attn.num_heads``
    and ``.scaling`` (the softmax scale) and takes an MLA attention backend."""

    def __call__(
        self, spec: ModelSpec, device: torch.device, matmul: "QuantizedMatmul | None"
    ) -> torch.nn.Module: ...


class StepRunner(Protocol):
    """What the scheduler and the engine use of a runner: building a batch (``prepare_*``,
    which writes the new tokens' slots into ``req_pool.req_to_token``) apart from running it
    (``run``), so the overlap schedule builds batch N+1 while batch N runs.

    ``device`` is the torch device of the step's token ids (where the future-token map lives;
    the CPU for a runner whose own device is not torch's). ``metrics()`` are its counters for
    ``get_server_info``; ``metrics()["graph_capture"]`` True means decode replays captured
    programs, which the engine warms up before serving.
    """

    kv_pool: KVPool
    req_pool: "ReqToTokenPool"
    device: torch.device

    def prepare_extend(self, items: "list[ExtendItem]") -> "tuple[Any, list[int]]":
        """The extend batch for ``items`` and, per item, how many logits rows are its."""

    def prepare_decode(self, reqs: "list[Req]", slots: torch.Tensor, input_ids: list[int]) -> Any:
        """The decode batch: ``input_ids[i]`` at position ``reqs[i].kv_len``."""

    def run(self, batch: Any) -> "torch.Tensor | GreedyTokens":
        """Logits for the batch's logits rows (or the model's greedy tokens)."""

    def metrics(self) -> dict[str, Any]:
        """Counters for ``get_server_info``."""


class GraphRunner(ABC):
    """Captures decode for fixed batch sizes and replays it with padding."""

    @abstractmethod
    def can_run(self, batch: "ForwardBatch") -> bool: ...

    @abstractmethod
    def replay(self, batch: "ForwardBatch", run: Callable[["ForwardBatch"], Any]) -> Any: ...

    def stats(self) -> dict[str, Any]:
        """Counters for ``get_server_info`` (captured sizes, compiles). Default: none."""
        return {}


class Backend:
    """One device: its self-description, defaults and factories, chosen once by ``--device``.

    Subclass it, set ``name`` (and usually ``priority``), implement
    :meth:`create_attention_backend` and override whatever else differs from these defaults.
    Register the class from a plugin's ``plait_register_backends(register)`` hook (see
    ``plait/backends/hookspecs.py`` and ``docs/writing-a-backend.md``).

    Invariants:
    - ``info()`` and ``unavailable_reason()`` are classmethods called for *every* registered
      backend; they must not import device libraries (triton, jax, torch_npu) unless that is
      the only way to tell availability. Everything else runs only on the chosen backend.
    - The registry instantiates the class once, after ``info()`` said available, with the
      user's options: an instance of :attr:`options_type` (a keyword-only dataclass of the
      backend's switches) or None for its defaults. A backend with no switches keeps
      ``options_type = None`` and refuses any options.
    - The factories are called in this order: ``create_kv_pool``, ``create_allocator``,
      ``create_model_runner`` (whose default calls ``create_attention_backend`` and
      ``create_graph_runner``).
    """

    #: the ``--device`` value that selects this backend
    name: ClassVar[str]
    #: ``--device auto`` picks the available backend with the highest priority (cpu is 0)
    priority: ClassVar[int] = 0
    #: the engine's ``dtype`` when the user sets none ("float32", "float16" or "bfloat16")
    default_dtype: ClassVar[str] = "float32"
    #: the engine's ``page_size`` when the user sets none: one the attention kernel accepts
    default_page_size: ClassVar[int] = 1
    #: the ``torch.distributed`` backend for tensor parallelism ("gloo", "nccl", "hccl", ...)
    distributed_backend: ClassVar[str] = "gloo"
    #: how this backend can run decode: "captured" (it implements ``create_graph_runner``, or
    #: compiles every step itself like the TPU's ``jax.jit`` buckets) and/or "eager". The
    #: engine refuses, before loading anything, ``--enable-graph-capture`` where "captured" is
    #: missing and ``--disable-graph-capture`` where "eager" is: never a flag ignored.
    #: Default: eager only, since the default ``create_graph_runner`` captures nothing.
    decode_modes: ClassVar[frozenset[str]] = frozenset({"eager"})
    #: capture decode unless the user disables it (must be allowed by ``decode_modes``); a
    #: backend whose capture is slow to build (the CPU's torch.compile) keeps False and users
    #: opt in with ``--enable-graph-capture``
    default_graph_capture: ClassVar[bool] = False
    #: whether ``--tp`` > 1 works here: every rank runs the core
    #: :class:`~plait.core.model_runner.ModelRunner` on its shard (rank 0 broadcasts the batch
    #: its ``build_*`` made). A backend whose ``create_model_runner`` returns a runner of its own
    #: sets False, and the engine refuses ``--tp`` > 1 before any rank starts.
    supports_tensor_parallel: ClassVar[bool] = True
    #: whether ``create_model_runner`` honours ``ModelSpec.deterministic`` (batch-invariant
    #: kernels); the engine refuses ``--enable-deterministic-inference`` elsewhere
    supports_deterministic_inference: ClassVar[bool] = False
    #: the dataclass of this backend's switches (``Engine(backend_options=...)``), or None
    options_type: ClassVar[type | None] = None

    def __init__(self, options: Any = None):
        """``options``: an :attr:`options_type` instance, or None for the defaults; anything
        else is a ValueError naming the type this backend takes (a switch is never ignored).
        A subclass with options calls this and keeps its own default in ``self.options``."""
        if options is not None and (
            self.options_type is None or not isinstance(options, self.options_type)
        ):
            wanted = (
                "none (it has no options)"
                if self.options_type is None
                else self.options_type.__name__
            )
            raise ValueError(
                f"backend_options for the {self.name!r} backend must be "
                f"{wanted}, got {type(options).__name__}"
            )
        self.options = options

    # ----- detection (classmethods: called for every registered backend) -----

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here (shown to the user), or None when it can.

        Default: always available."""
        return None

    @classmethod
    def info(cls) -> BackendInfo:
        """The backend's self-description, built from ``name``, ``priority`` and
        :meth:`unavailable_reason`."""
        reason = cls.unavailable_reason()
        return BackendInfo(
            name=cls.name, priority=cls.priority, available=reason is None, reason=reason or ""
        )

    # ----- the chosen backend -----

    def bind_tp_rank(self, rank: int) -> None:
        """Called once in each tensor-parallel rank's process, before anything is allocated,
        so the rank uses its own device. Default: ``torch.<device type>.set_device(rank)``
        where the device type has one (cuda, npu, xpu); nothing on the CPU, whose ranks are
        separated by threads and core affinity instead (``plait.core.tp.launcher``)."""
        kind = self.torch_device.type
        module = getattr(torch, kind, None)
        set_device = getattr(module, "set_device", None)
        if kind != "cpu" and set_device is not None:
            set_device(rank)

    def host_thread(self) -> ContextManager[None]:
        """Context for engine threads that do host-side torch work but run no forward: the
        engine's whole start-up (KV pools, model loading) on the caller's thread, and the
        scheduler loop when forwards run on a worker thread. Default: nothing; the CPU backend
        frees the thread's OpenMP team if it has one and runs the body with one OpenMP (and
        MKL) thread, so only the forward thread owns a team (``plait.backends.cpu.threads``
        says why)."""
        return contextlib.nullcontext()

    @property
    def torch_device(self) -> torch.device:
        """Where the model's torch tensors live. Default: the CPU."""
        return torch.device("cpu")

    def create_kv_pool(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        page_size: int,
    ) -> KVPool:
        """The paged K/V buffers (slot 0 reserved for padding). Default: a torch
        :class:`KVPool` on :attr:`torch_device`."""
        return KVPool(
            num_slots, num_layers, num_kv_heads, head_dim, dtype, self.torch_device, page_size
        )

    def create_latent_kv_pool(
        self, *, layout: "KVCacheLayout", num_slots: int, dtype: torch.dtype, page_size: int
    ) -> "LatentKVPool":
        """The paged latent buffers of a multi-head latent attention model (``layout.kind ==
        "latent"``, ``plait.core.mla``). Default: a torch
        :class:`~plait.core.mla.LatentKVPool` on :attr:`torch_device`."""
        from plait.core.mla import LatentKVPool

        return LatentKVPool(layout, num_slots, dtype, self.torch_device, page_size)

    def create_mla_attention_backend(
        self, kv_pool: "LatentKVPool", num_heads: int, scale: float
    ) -> "MLAAttentionBackend":
        """Absorbed-form attention over a latent pool (DeepSeek-V2/V3). Default: refused with
        a ValueError naming the backend, so an MLA model never loads where it cannot run."""
        raise ValueError(
            f"backend {self.name!r} has no multi-head latent attention (MLA, the "
            "DeepSeek-V2/V3 attention)"
        )

    def create_allocator(self, num_slots: int, page_size: int) -> "TokenSlotAllocator":
        """The token-slot allocator over the pool's slots (page granularity when
        ``page_size > 1``). Default: the core's free list on :attr:`torch_device`."""
        from plait.core.memory import TokenSlotAllocator

        return TokenSlotAllocator(num_slots, page_size, self.torch_device)

    def create_attention_backend(
        self, kv_pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int
    ) -> "AttentionBackend":
        """The attention implementation over ``kv_pool``. Every backend that keeps the
        default :meth:`create_model_runner` must implement it."""
        raise NotImplementedError(
            f"backend {self.name!r} implements neither create_attention_backend nor "
            "create_model_runner"
        )

    def quantized_linear(self, method: str, activations: str = "float") -> "QuantizedMatmul":
        """The matmul of quantized Linear layers for ``--quantization method``:
        ``f(x[..., K], weight: QuantizedWeight) -> [..., N]`` in ``x``'s dtype, matching
        :func:`plait.quant.formats.dequantize` followed by ``F.linear`` up to float rounding
        (``activations="float"``), or up to the activations' int8 rounding
        (``activations="int8"``, :func:`plait.quant.formats.quantize_activations`).

        Default: float activations exactly so, in torch (portable, but the float weight is
        rebuilt per call, so only memory is saved). A backend raises ValueError for a method
        or an activations value it cannot run."""
        refuse_int8_activations(self.name, activations)
        from plait.quant.modules import torch_quantized_matmul

        return torch_quantized_matmul

    def fused_moe(self) -> "FusedExperts":
        """The mixture-of-experts product of MoE layers, with the signature and result of
        :func:`plait.ops.fused_moe.fused_experts` (tokens grouped by expert, one product per
        expert that has tokens). :func:`default_model_runner` hands it to the model loader in
        ``ModelSpec.fused_moe``. Default: that torch op (any device torch runs on)."""
        from plait.ops.fused_moe import fused_experts

        return fused_experts

    def create_graph_runner(self, model: Any, max_batch_size: int) -> "GraphRunner | None":
        """Decode capture (CUDA/HIP graphs, ``jax.jit`` buckets, ...). Default: None, decode
        runs eagerly. :class:`plait.core.graph_runner.DecodeGraphRunner` does the padding and
        bookkeeping for any capture API."""
        return None

    def create_model_runner(
        self, spec: ModelSpec, kv_pool: KVPool, req_pool: "ReqToTokenPool"
    ) -> "StepRunner | None":
        """The forward pass the scheduler drives (a :class:`StepRunner`), or None for the
        core's default: :func:`plait.core.model_runner.default_model_runner`, Plait's torch
        model (built by ``spec.load_model``) on :attr:`torch_device` with this backend's
        :meth:`create_attention_backend` and :meth:`create_graph_runner` over the paged pool.

        Default: None. A backend may return its own runner instead (a JAX model, a vendor
        engine) as long as it reads and writes K/V through ``kv_pool`` at the slots
        ``req_pool`` holds, or wrap the default one (call ``default_model_runner`` and adjust
        it, as the CPU backend does). Tensor parallelism (``spec.tp.size > 1``) needs a
        :class:`~plait.core.model_runner.ModelRunner` (its ``prepare_*``/``run`` split lets
        rank 0 broadcast the batch it built) over the shard of ``spec.tp``.
        """
        return None

    def free_memory_bytes(self) -> int | None:
        """Bytes free on the device now (``--mem-fraction`` sizes the KV cache from it), or
        None when this backend cannot tell; the server then asks for ``--max-total-tokens``
        or ``--kv-cache-memory-gb`` instead. Default: None (unknown)."""
        return None


def refuse_int8_activations(backend: str, activations: str) -> None:
    """ValueError unless ``activations`` is ``float``: for backends with no int8-activation
    kernel (a flag they would otherwise ignore)."""
    if activations != "float":
        raise ValueError(
            f"quantization_activations={activations!r} is not supported by the "
            f"{backend!r} backend (only 'float')"
        )


def refuse_experts(model: Any) -> None:
    """ValueError for ``--enable-deterministic-inference`` on a mixture-of-experts model: its
    expert products group rows by expert, so a row's sums depend on the rest of the batch."""
    for m in model.modules():
        if any(w in type(m).__name__.lower() for w in ("moe", "experts")):
            raise ValueError(
                "enable_deterministic_inference (--enable-deterministic-inference) does "
                f"not support mixture-of-experts models yet ({type(m).__name__})"
            )
