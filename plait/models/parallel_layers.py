"""The three layers Megatron-style tensor parallelism adds to a Llama model.

Column-parallel projections (fused qkv, gate/up) need no layer of their own: a rank's
``nn.Linear`` simply has fewer output rows (its heads, its intermediate columns). What needs
communication is here, and each layer is the plain torch layer when ``tp.size == 1``:

- :class:`RowParallelLinear` (o_proj, down_proj): a rank multiplies its input columns by its
  slice of the weight's input columns; the partial sums are added with one all-reduce, and the
  bias (replicated) is added once, after it.
- :class:`VocabParallelEmbedding`: a rank holds vocabulary rows ``[vocab_start, vocab_stop)``,
  embeds the ids in its range, zeroes the others; one all-reduce assembles every row.
- :class:`ParallelLMHead`: a rank computes the logits of its vocabulary rows; one all-gather
  concatenates them, so every rank returns the full ``[rows, vocab]`` logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plait.core.tp.group import TPGroup
from plait.core.tp.sharding import split_range, split_sizes


class RowParallelLinear(nn.Linear):
    """``weight``: [out, in_local]; ``bias``: [out] (the full bias, added after the sum)."""

    def __init__(self, in_local: int, out_features: int, bias: bool, tp: TPGroup):
        super().__init__(in_local, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """``weight``: [vocab_stop - vocab_start, hidden]: this rank's rows of the table."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.vocab_start, self.vocab_stop = split_range(vocab_size, tp.size, tp.rank)
        self.weight = nn.Parameter(torch.empty(self.vocab_stop - self.vocab_start, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.vocab_start) & (ids < self.vocab_stop)
        out = F.embedding((ids - self.vocab_start).masked_fill(~mine, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(~mine.unsqueeze(-1), 0))


class ParallelLMHead(nn.Linear):
    """``weight``: this rank's vocabulary rows, the same range as the embedding's (so tied
    weights stay one tensor per rank)."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TPGroup):
        self.vocab_start, self.vocab_stop = split_range(vocab_size, tp.size, tp.rank)
        super().__init__(hidden_size, self.vocab_stop - self.vocab_start, bias=False)
        self.tp = tp
        self.sizes = split_sizes(vocab_size, tp.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_last_dim(super().forward(x), self.sizes)
