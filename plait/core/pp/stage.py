"""Which decoder layers a pipeline rank holds.

Layers are dealt out in contiguous runs whose sizes differ by at most one (the first
``num_layers % size`` ranks hold one more). Rank 0 also holds the embedding, the last rank the
final norm and the LM head; with ``size == 1`` the one stage holds everything and nothing in
the model changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.core.tp.sharding import split_range


@dataclass(frozen=True, kw_only=True)
class PPStage:
    """Rank ``rank`` of ``size`` holds decoder layers ``start..stop`` (global indices) of a
    model with ``num_layers`` (0: unknown, only valid with ``size == 1``)."""

    rank: int = 0
    size: int = 1
    num_layers: int = 0

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"pp rank {self.rank} is not in a pipeline of size {self.size}")
        if self.size > 1 and self.num_layers < self.size:
            raise ValueError(
                f"pp_size={self.size}: the model has {self.num_layers} decoder layers; "
                "every pipeline rank needs at least one"
            )

    @property
    def start(self) -> int:
        return split_range(self.num_layers, self.size, self.rank)[0]

    @property
    def stop(self) -> int:
        return split_range(self.num_layers, self.size, self.rank)[1]

    @property
    def held_layers(self) -> int:
        return self.stop - self.start

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    @property
    def partial(self) -> bool:
        """Whether this stage holds less than the whole model."""
        return self.size > 1

    def largest_share(self) -> int:
        """The most layers any rank of this pipeline holds (rank 0's)."""
        return split_range(self.num_layers, self.size, 0)[1]
