"""Linear weights in Ascend's fractal NZ layout, cast once at load.

The Cube unit's matmuls read their right-hand operand in ``ACL_FORMAT_FRACTAL_NZ`` (29): 16x16
tiles. A weight left in the plain ND layout is converted again on every call; casting it once
with ``torch_npu.npu_format_cast(weight, 29)`` (as vLLM-Ascend does for its unquantized linears
under ``VLLM_ASCEND_ENABLE_NZ``) removes that conversion. The cast changes the storage layout
only: values, shape and dtype stay, so the model's ``nn.Linear`` forward is unchanged.

Cast: every floating ``nn.Linear`` weight, each parameter once (a weight shared by two Linears
is one parameter). Not cast: a weight some other module also owns (an ``lm_head`` tied to the
embedding table, which ``F.embedding`` reads row by row), and weights that are not Linears'
(DeepSeek's absorbed ``w_uk``/``w_uv``, stacked experts, norms).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ACL_FORMAT_FRACTAL_NZ = 29


def import_torch_npu() -> Any | None:
    """torch_npu, or None where it cannot be imported (the cast is then skipped)."""
    try:
        return importlib.import_module("torch_npu")
    except ImportError:
        return None


def nz_weights(model: nn.Module) -> list[nn.Linear]:
    """The Linears whose weight the cast applies to, each weight once (see the module doc)."""
    owned_elsewhere = {
        id(p)
        for m in model.modules()
        if not isinstance(m, nn.Linear)
        for p in m.parameters(recurse=False)
    }
    seen: set[int] = set()
    linears = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not isinstance(m, nn.Linear) or not isinstance(w, torch.Tensor):
            continue
        if not w.is_floating_point() or id(w) in seen or id(w) in owned_elsewhere:
            continue
        seen.add(id(w))
        linears.append(m)
    return linears


def cast_linear_weights_to_nz(model: nn.Module, torch_npu: Any | None) -> int:
    """Cast the model's Linear weights to NZ in place; returns how many were cast (0 without
    torch_npu)."""
    if torch_npu is None or not hasattr(torch_npu, "npu_format_cast"):
        log.info("torch_npu.npu_format_cast unavailable: Linear weights stay ND")
        return 0
    config = getattr(getattr(torch, "npu", None), "config", None)
    if config is not None:  # torch_npu keeps a cast's internal format only when allowed
        config.allow_internal_format = True  # (vLLM-Ascend's model runner sets it too)
    linears = nz_weights(model)
    for m in linears:
        # .data keeps the Parameter object (and every reference to it) while its storage
        # takes the NZ layout
        m.weight.data = torch_npu.npu_format_cast(m.weight.data, ACL_FORMAT_FRACTAL_NZ)
    log.info("cast %d Linear weights to FRACTAL_NZ", len(linears))
    return len(linears)
