"""Greedy decode tokens without the float32 LM head's full product (``csrc/src/greedy_head.cpp``).

Why: for SmolLM2-135M the LM head is 113 MB of the 540 MB a decode step streams and a fifth of
its multiply-adds, and a request that decodes greedily needs only the index of its largest
logit. The kernel screens every logit in bfloat16 (AVX-512 BF16: half the bytes, twice the
multiply-adds a cycle), bounds how far each can be from its float32 value, and recomputes only
the tokens that could still be the maximum in float32, exactly as the panel GEMM computes them.
The 768 decode rows of eight 96-token prompts had a median of 5 such candidates (at most 38);
the head's time per step went from 2.5 to 1.3 ms at batch 1, 5.1 to 3.0 ms at batch 16 and
18.7 to 10.7 ms at batch 64 (2 threads, this machine).

What holds: the token is the first index of the float32 logits' maximum, the one
``torch.max`` would return from the logits the panel head computes, bit for bit; a row the
screen cannot decide (a non-finite hidden state or logit) gets its logits from the panel head
and the sampler's rule. Used only for ``ForwardBatch.greedy_only`` decode batches, on a CPU with
AVX-512 BF16, for an LM head packed in float32 panels without bias.
"""

from __future__ import annotations

import functools
import logging
import math
from types import ModuleType
from typing import Optional

import torch
from torch import nn

from plait.backends.cpu import cpp_build
from plait.backends.cpu.linear import PackedLinear
from plait.core.forward_batch import GreedyTokens

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def extension() -> Optional[ModuleType]:
    """The AVX-512 build's ``greedy_head`` kernels where this CPU runs their BF16 screen, else
    None."""
    if cpp_build.best_level() != "avx512vnni":
        return None
    try:
        ext = cpp_build.extension().greedy_head
    except Exception as e:  # a missing compiler surfaces as several error types
        log.warning("the CPU kernels did not build (%s); greedy decode computes full logits", e)
        return None
    return ext if ext.available() else None


class GreedyHead:
    """Greedy tokens from final-normed hidden states for one LM head (see the module
    docstring). Build it with :meth:`for_head`."""

    def __init__(self, head: PackedLinear, ext: ModuleType):
        self.head = head
        self._ext = ext
        self.packed, self.norms = ext.pack(head.packed_weight, head.out_features)

    @classmethod
    def for_head(cls, head: nn.Module) -> "GreedyHead | None":
        """A greedy head for ``head`` where the kernel can serve it: a float32 panel
        :class:`PackedLinear` that kept its panels, without bias, an even ``in_features``,
        AVX-512 BF16 here."""
        ext = extension()
        if (
            ext is None
            or not isinstance(head, PackedLinear)
            or head.layout != "panel"
            or not head.has_panels
            or head.bias is not None
            or head.in_features % 2
        ):
            return None
        return cls(head, ext)

    def __call__(self, hidden: torch.Tensor) -> GreedyTokens:
        """``hidden`` [B, in_features]: the LM head's input. One token per row."""
        ids = self._ext.argmax(hidden, self.packed, self.norms, self.head.packed_weight).tolist()
        tokens: list[int | None] = list(ids)
        undecided = [b for b, t in enumerate(ids) if t < 0]
        if undecided:  # the panel head's logits and the sampler's rule for these rows
            values, indices = self.head(hidden[undecided]).max(dim=-1)
            for b, v, i in zip(undecided, values.tolist(), indices.tolist()):
                tokens[b] = i if math.isfinite(v) else None
        return GreedyTokens(tokens=tokens)
