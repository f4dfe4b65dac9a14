"""Forward metadata: everything a model forward and its attention need, built once per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from plait.core.request import Req


@dataclass(kw_only=True)
class ForwardBatch:
    """One forward pass over B requests.

    Extend (prefill, possibly chunked or after a prefix-cache hit): request b contributes
    ``extend_lens[b]`` new tokens at positions ``prefix_lens[b] .. seq_lens[b]-1``; their rows in
    ``input_ids`` are concatenated in batch order. Decode: one token per request
    (``extend_lens`` all 1, ``prefix_lens = seq_lens - 1``).

    ``req_to_token[req_pool_indices[b], i]`` is the KV slot of request b's i-th token; the new
    tokens' slots (``out_cache_loc``) are already written there before the forward.
    """

    is_decode: bool
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64 slots for the new tokens' K/V
    req_pool_indices: torch.Tensor  # [B] int64 rows of req_to_token
    seq_lens: torch.Tensor  # [B] int64 length after this forward
    prefix_lens: torch.Tensor  # [B] int64 tokens already in the pool before this forward
    extend_lens: torch.Tensor  # [B] int64 new tokens per request
    req_to_token: torch.Tensor  # [R, max_context] int32, the whole table
    logits_rows: torch.Tensor  # [N] int64 rows of hidden states to project to logits
    # Host copies: kernels on CPU loop over these without device syncs.
    seq_lens_cpu: list[int]
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    #: decode only: every row is sampled by a request that takes the argmax of the raw logits
    #: (``plait.core.sampler.takes_plain_argmax``), so the model may answer with
    #: :class:`GreedyTokens` instead of logits
    greedy_only: bool = False
    #: per request, its LoRA adapter's name (None: the base model); None when no request of
    #: the batch has one. A batch with adapters runs the model's eager layers (the wrapped
    #: projections add the deltas), never a backend's compiled or native step.
    lora_ids: list[str | None] | None = None
    #: pipeline parallelism (``plait.core.pp``): the previous stage's hidden states ``[T, H]``,
    #: which a stage without the embedding runs its layers on; None on the first stage
    pp_hidden: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(kw_only=True)
class GreedyTokens:
    """A model's answer to a ``greedy_only`` batch: the argmax of each row's float32 logits,
    exactly the token ``torch.max`` would pick from them (first maximal index), without the
    logits themselves. ``None`` for a row whose logits are not all finite (the sampler fails
    such a row alone, as it does from logits)."""

    tokens: list[int | None]


@dataclass(kw_only=True)
class ExtendItem:
    """One request's share of an extend batch: tokens ``start..start+length`` of fill_ids
    (or, for a speculative verify pass, ``tokens``: the last token and the drafts, which are
    not in fill_ids until they are accepted)."""

    req: Req
    start: int
    length: int
    slots: torch.Tensor  # KV slots for the new tokens
    logit_from: int  # first absolute position whose logits we need
    tokens: list[int] | None = None  # None: fill_ids[start : start + length]

    @property
    def token_ids(self) -> list[int]:
        """The ``length`` tokens this item computes, at positions ``start..``."""
        if self.tokens is not None:
            return self.tokens
        return self.req.fill_ids[self.start : self.start + self.length]
