"""Matrix products for decode-sized batches: weights packed once, at load, for a kernel that
reads them in the order it multiplies.

Two packed forms, chosen per weight when the model loads (:func:`default_layout`):

- ``panel`` (where the AVX-512 build of ``csrc/src/panel_gemm.cpp`` compiles): the weight as
  48-column float32 panels, multiplied by its kernel. A bfloat16 weight (``--dtype bfloat16``)
  is upcast (exactly) and kept only as its 16-bit form below: half the bytes of float32, the
  products in float32 (this CPU has no bf16 products to use: its AVX-512 has no BF16 extension,
  so oneDNN widens them too); a bfloat16 activation is widened and the result rounded back. On the 2-core AVX-512 development
  machine it ran all of SmolLM2-135M's products for one decode step, weights streamed from
  memory, in 11 ms at M=1, 23 ms at M=16 and 81 ms at M=64, where oneDNN took 28, 33 and 94 ms;
  from M ~ 128 the two are within a few per cent (``benchmarks/kernels/panel_gemm_cpu.py``).
- ``onednn`` (float32 or bfloat16 without that build): oneDNN's ``_linear_pointwise`` on a
  weight reordered by ``_reorder_linear_weight``. MKL's fp32 GEMM, which ``nn.Linear`` calls,
  repacks the weight on every call; oneDNN's reordered weight is read once per call (the
  lm_head [576 x 49152] at M=16: 24.8 ms with MKL, 7.4 ms packed).

A ``panel`` weight also gets a lossless smaller form where it has one, checked bit for bit at
load: 4-bit codes (``panel_gemm.encode_affine4``: every 32-input block of each output holds at
most 16 values ``q * d + m``, as a checkpoint converted from GGUF Q4_1 does; ~6 bits a weight),
else 16-bit halves (``encode_bf16``: every value is a bfloat16, as in a checkpoint upcast from
bfloat16). Products read it instead of the float32 panels (the 4-bit form up to
``register_decode_rows`` rows, decode at small batch; the 16-bit form at every size): fewer
bytes to stream, the same float32 results bit for bit. A weight with the 16-bit form drops its
float32 panels, since nothing reads them (half the memory), unless it is built with
``keep_panels`` (the LM head: the greedy head reads its panels). A 4-bit weight keeps them:
products above ``register_decode_rows`` rows read them.

Invariants:
- A :class:`PackedLinear` computes ``x @ W.T + b`` for the ``nn.Linear`` it replaced, up to
  float rounding (a panel product sums each row in k order with fused multiply-adds, the same
  for a row whatever else is in the batch); its packed weight is its own copy in a layout
  nothing else reads (oneDNN's is opaque: no strides, no views), so a tied ``lm_head`` gets
  its own packed copy and the embedding keeps the dense original.
- Packing happens once; the weights are never repacked per call or per batch size.
- Under ``torch.compile`` the product is the custom op ``plait::packed_linear(x, handle)``:
  Dynamo cannot trace opaque tensors or pybind calls, so the op takes an integer handle into a
  registry of live :class:`PackedLinear` modules (weak references: a dropped model frees its
  weights). Inductor fuses the elementwise work around it and calls the same kernel.
- Only float32 and bfloat16 are packed (oneDNN's fp16 path needs AVX-512-FP16); a
  bfloat16 weight in panels always has its 16-bit form (every value is a bfloat16), so with
  ``compact`` it keeps only the halves (the LM head keeps its panels too); other dtypes,
  or a torch built without oneDNN and no panel kernel, keep ``nn.Linear`` (see
  :func:`can_prepack`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import weakref
from types import ModuleType
from typing import Collection, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
LAYOUTS = ("panel", "onednn")


@functools.lru_cache(maxsize=None)
def panel_extension() -> Optional[ModuleType]:
    """The AVX-512 build's ``panel_gemm`` kernels, or None where this CPU has no AVX-512 (VNNI
    level) or it cannot be compiled here (the reason logged once)."""
    from plait.backends.cpu import cpp_build

    if cpp_build.best_level() != "avx512vnni":
        return None
    try:
        return cpp_build.extension("avx512vnni").panel_gemm
    except Exception as e:  # a missing compiler surfaces as several error types
        log.warning("panel GEMM kernel unavailable (%s); float32 weights stay on oneDNN", e)
        return None


def default_layout(dtype: torch.dtype) -> Optional[str]:
    """The packed form :func:`prepack_linears` gives weights of ``dtype`` on this machine:
    ``panel`` for float32 and bfloat16 where the AVX-512 kernel builds, else ``onednn`` where
    torch has oneDNN, else None (unpacked)."""
    if dtype not in PACKABLE_DTYPES:
        return None
    if panel_extension() is not None:
        return "panel"
    return "onednn" if torch.backends.mkldnn.is_available() else None


def can_prepack(dtype: torch.dtype) -> bool:
    """Whether :func:`prepack_linears` will pack weights of this dtype on this machine."""
    return default_layout(dtype) is not None


_LIVE: "weakref.WeakValueDictionary[int, PackedLinear]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@torch.library.custom_op("plait::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int) -> torch.Tensor:
    """``x @ W.T + b`` for the live :class:`PackedLinear` registered under ``handle``."""
    return _LIVE[handle].linear(x)


@packed_linear.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], _LIVE[handle].out_features)


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight is packed for one kernel: ``layout``
    ``panel`` or ``onednn``; None takes :func:`default_layout`. A bfloat16 weight in ``panel``
    is computed in float32 (its panels hold the upcast values, exactly)."""

    #: non-persistent buffers that are weights (``plait.quant.modules.weight_bytes`` counts them)
    weight_buffers = ("packed_weight", "bias", "codes", "code_scales", "code_offsets")

    def __init__(
        self,
        linear: nn.Linear,
        layout: Optional[str] = None,
        compact: bool = True,
        keep_panels: bool = False,
    ):
        """``compact``: also keep a ``panel`` weight's lossless 4-bit or 16-bit form where it
        has one (:attr:`compact_format` tells which). With the 16-bit form the float32 panels
        are dropped (:attr:`has_panels` false) unless ``keep_panels``."""
        super().__init__()
        weight = linear.weight.detach().contiguous()
        layout = default_layout(weight.dtype) if layout is None else layout
        if layout not in LAYOUTS:
            raise ValueError(
                f"layout must be one of {LAYOUTS}, got {layout!r} "
                f"(for a {weight.dtype} weight on this machine)"
            )
        self.layout = layout
        self._panel: Optional[ModuleType] = None
        if layout == "panel":
            self._panel = panel_extension()
            if weight.dtype not in PACKABLE_DTYPES or self._panel is None:
                raise ValueError(
                    f"layout='panel' needs a float32 or bfloat16 weight (got {weight.dtype}) "
                    f"and the AVX-512 panel kernel (built here: "
                    f"{self._panel is not None})"
                )
            packed = self._panel.pack(weight.float())  # bf16 -> float32 is exact
        else:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.handle = next(_HANDLES)
        _LIVE[self.handle] = self
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # A buffer, not a Parameter: opaque tensors cannot be parameters, and it never trains.
        self.register_buffer("packed_weight", packed, persistent=False)
        bias = linear.bias
        if bias is not None and layout == "panel":
            bias = bias.float()  # the panel product adds a float32 bias
        self.register_buffer(
            "bias", None if bias is None else bias.detach().contiguous(), persistent=False
        )
        form: list[torch.Tensor] = []
        if compact and self._panel is not None:
            # a bfloat16 weight takes the 16-bit form only: a 4-bit one would keep float32
            # panels for larger products, twice the bf16 weight's memory
            four = weight.dtype == torch.float32 and self._panel.encode_affine4(packed)
            form = four or self._panel.encode_bf16(packed)
        #: "affine4", "bf16" or None: the lossless form ``panel_gemm.linear_with_form`` reads
        self.compact_format = {3: "affine4", 1: "bf16"}.get(len(form))
        if self.compact_format == "bf16" and not keep_panels:
            # linear_bf16 serves every size at least as fast as the panels, the same bits
            self.packed_weight = packed.new_empty(0)
        form = form + [None] * (3 - len(form))
        for name, tensor in zip(("codes", "code_scales", "code_offsets"), form):
            self.register_buffer(name, tensor, persistent=False)

    @property
    def has_panels(self) -> bool:
        """Whether the packed float32 (or oneDNN) weight is kept; a weight whose 16-bit form
        replaced it has none."""
        return self.packed_weight.numel() > 0

    @property
    def compact(self) -> bool:
        """Whether the weight has a lossless smaller form."""
        return self.codes is not None

    def compact_form(self) -> list[torch.Tensor]:
        """``[codes, scales, offsets]`` (``panel_gemm.encode_affine4``), ``[halves]``
        (``encode_bf16``), or [] without a form."""
        return [t for t in (self.codes, self.code_scales, self.code_offsets) if t is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return packed_linear(x, self.handle)
        return self.linear(x)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if self._panel is not None:
            # float32 products; a bfloat16 activation (an eager bf16 step) widened, the
            # result rounded back to its dtype
            y = self._panel.linear_with_form(
                x.float(), self.packed_weight, self.compact_form(), self.out_features, self.bias
            )
            return y.to(x.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, layout={self.layout}, "
            f"compact={self.compact_format}"
        )


def computes_plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` computes exactly ``nn.Linear``'s product. A subclass does when it adds
    nothing around it: Plait's tensor-parallel layers (``plait.models.parallel_layers``) at
    ``tp.size == 1``; with more ranks they communicate, and keep their ``nn.Linear``."""
    if type(module) is nn.Linear:
        return True
    tp = getattr(module, "tp", None)
    return isinstance(module, nn.Linear) and tp is not None and tp.size == 1


def prepack_linears(
    model: nn.Module,
    layout: Optional[str] = None,
    compact: bool = True,
    keep_panels: Collection[str] = ("lm_head",),
) -> int:
    """Replace every Linear of ``model`` that :func:`computes_plain_linear` by a
    :class:`PackedLinear`, in place, in ``layout`` (None: :func:`default_layout` per dtype),
    with its lossless 4-bit or 16-bit form where it has one and ``compact``. Linears whose
    attribute name is in ``keep_panels`` keep their float32 panels beside a 16-bit form (the
    greedy head reads the LM head's).

    Returns how many were replaced (0 when the model's dtype cannot be packed here).
    """
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or None, got {layout!r}")
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if computes_plain_linear(child) and can_prepack(child.weight.dtype)
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child, layout, compact, name in keep_panels))
    return len(targets)


def compact_summary(model: nn.Module) -> str:
    """How many of ``model``'s packed Linears have a lossless smaller form, of which kind, and
    the bytes small products stream with and without them (for the engine's log)."""
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    compact = [m for m in packed if m.compact]
    if not compact:
        return f"none of {len(packed)} packed Linear weights has a lossless smaller form"
    full = sum(m.in_features * m.out_features * 4 for m in compact)
    small = sum(t.numel() * t.element_size() for m in compact for t in m.compact_form())
    dropped = sum(not m.has_panels for m in compact)
    kinds = ", ".join(
        f"{sum(m.compact_format == k for m in compact)} {k}"
        for k in ("affine4", "bf16")
        if any(m.compact_format == k for m in compact)
    )
    return (
        f"{len(compact)} of {len(packed)} packed Linear weights have a lossless smaller "
        f"form ({kinds}; 4-bit read up to {panel_extension().register_decode_rows} rows, "
        f"16-bit always): {full / 2**20:.0f} MiB of float32 weights as "
        f"{small / 2**20:.0f} MiB; {dropped} dropped their float32 panels"
    )
