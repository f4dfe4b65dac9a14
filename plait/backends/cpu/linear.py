"""Matrix products for decode-sized batches: weights reordered once, at load, for oneDNN.

MKL's fp32 GEMM, which ``nn.Linear`` calls, repacks the weight on every call; for the small M
of decode (1-64 rows) that repacking streams the whole weight through memory twice. oneDNN's
``_linear_pointwise`` on a weight reordered ahead of time by ``_reorder_linear_weight`` reads
it once, in its blocked layout. On the 2-core AVX-512 development machine the lm_head
[576 x 49152] product took 24.8 ms with MKL and 7.4 ms packed at M=16 (all 121 products of
SmolLM2-135M: 61 -> 34 ms); at M=1 the two are within noise. docs/benchmarks.md has the
whole-step figures.

Invariants:
- A :class:`PackedLinear` computes ``x @ W.T + b`` for the ``nn.Linear`` it replaced; its
  packed weight is an opaque oneDNN tensor (no strides, no views), so nothing else may share it:
  a tied ``lm_head`` gets its own packed copy and the embedding keeps the dense original.
- Packing happens once; the weights are never repacked per call or per batch size.
- Under ``torch.compile`` the product is the custom op ``plait::packed_linear(x, handle)``:
  Dynamo cannot trace opaque tensors, so the op takes an integer handle into a registry of
  live :class:`PackedLinear` modules (weak references: a dropped model frees its weights).
  Inductor fuses the elementwise work around it and calls the same oneDNN kernel.
- Only float32 and bfloat16 are packed (oneDNN's fp16 path needs AVX-512-FP16); other dtypes,
  or a torch built without oneDNN, keep ``nn.Linear`` (see :func:`can_prepack`).
"""
from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def can_prepack(dtype: torch.dtype) -> bool:
    """Whether :func:`prepack_linears` will pack weights of this dtype on this machine."""
    return dtype in PACKABLE_DTYPES and torch.backends.mkldnn.is_available()


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
    """An inference-only ``nn.Linear`` whose weight lives in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.handle = next(_HANDLES)
        _LIVE[self.handle] = self
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().contiguous()
        # A buffer, not a Parameter: opaque tensors cannot be parameters, and it never trains.
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight),
                             persistent=False)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return packed_linear(x, self.handle)
        return self.linear(x)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none",
                                                  [], "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, layout=onednn-packed")


def computes_plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` computes exactly ``nn.Linear``'s product. A subclass does when it adds
    nothing around it: Plait's tensor-parallel layers (``plait.models.parallel_layers``) at
    ``tp.size == 1``; with more ranks they communicate, and keep their ``nn.Linear``."""
    if type(module) is nn.Linear:
        return True
    tp = getattr(module, "tp", None)
    return isinstance(module, nn.Linear) and tp is not None and tp.size == 1


def prepack_linears(model: nn.Module) -> int:
    """Replace every Linear of ``model`` that :func:`computes_plain_linear` by a
    :class:`PackedLinear`, in place.

    Returns how many were replaced (0 when the model's dtype cannot be packed here).
    """
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children()
               if computes_plain_linear(child) and can_prepack(child.weight.dtype)]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
