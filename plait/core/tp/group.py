"""A rank's view of its tensor-parallel group: who it is and the two collectives the model needs.

The model holds a :class:`TPGroup` from construction (the loader needs ``rank`` and ``size`` to
pick its shard) but only calls the collectives in ``forward``, after every rank has joined the
default ``torch.distributed`` process group. With ``size == 1`` both collectives are the
identity and ``torch.distributed`` is never touched, so a single-rank model is exactly the
model it was before tensor parallelism existed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class TPGroup:
    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tp rank {self.rank} is not in a group of size {self.size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x``."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension; rank r's piece has
        ``sizes[r]`` columns. Pieces are padded to the largest size for the collective (which
        wants equal shapes) and trimmed after."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        width = max(sizes)
        if x.shape[-1] < width:
            x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        pieces = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(pieces, x.contiguous())
        return torch.cat([p[..., :n] for p, n in zip(pieces, sizes)], dim=-1)
