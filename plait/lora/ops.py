"""The batched LoRA product: each token's delta from its own adapter, no weights merged.

A batch's rows are grouped once per forward (:class:`LoraBatch`): requests are contiguous runs
of rows (segments), each with one adapter slot or the base model. The product for one wrapped
projection is then ``y += ((x @ A[s].T) @ B[s].T) * scaling[s]`` per adapter ``s``:

- :func:`apply_grouped` (the CPU path, and any device without the Triton kernels): one
  shrink and one expand per distinct adapter over all of its rows, gathered with one
  ``index_select``; a Python loop over at most ``max_loras_per_batch`` adapters, never over
  tokens; base rows are untouched.
- ``plait.lora.triton_ops`` (CUDA/ROCm): the same per segment, in two kernels (S-LoRA/Punica's
  SGMV shrink and expand).

The order of operations is peft's (``base(x) + lora_B(lora_A(x)) * scaling``), so float32
results differ from peft's only in the sums' rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class LoraBatch:
    """One forward's adapter layout. ``seg_*``: one entry per request with an adapter
    (``seg_starts``/``seg_lens`` in rows of the forward's input, ``seg_slots`` its slot);
    ``groups``: per distinct slot, the rows that use it (None: every row of the batch);
    ``row_slots``: every row's slot, -1 for the base model's rows (the CPU native step's form)."""

    seg_starts: torch.Tensor  # [G] int32
    seg_lens: torch.Tensor  # [G] int32
    seg_slots: torch.Tensor  # [G] int32
    seg_scales: torch.Tensor  # [G] float32: the slot's scaling
    max_seg_len: int
    groups: list[tuple[int, torch.Tensor | None]]
    scaling: list[float]  # per slot, host copy
    row_slots: torch.Tensor  # [T] int64

    @classmethod
    def build(
        cls,
        slots: list[int | None],
        lens: list[int],
        scaling: list[float],
        device: torch.device,
    ) -> "LoraBatch":
        """``slots[b]``: request b's adapter slot (None: the base model); ``lens[b]``: its
        rows in this forward."""
        starts, seg_l, seg_s = [], [], []
        rows: dict[int, list[int]] = {}
        row_slots: list[int] = []
        at = 0
        for slot, n in zip(slots, lens):
            if slot is not None and n:
                starts.append(at)
                seg_l.append(n)
                seg_s.append(slot)
                rows.setdefault(slot, []).extend(range(at, at + n))
            row_slots.extend([-1 if slot is None else slot] * n)
            at += n

        def t(v: list[int]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.int32, device=device)

        groups: list[tuple[int, torch.Tensor | None]] = [
            (s, None if len(r) == at else torch.tensor(r, dtype=torch.int64, device=device))
            for s, r in rows.items()
        ]
        return cls(
            seg_starts=t(starts),
            seg_lens=t(seg_l),
            seg_slots=t(seg_s),
            seg_scales=torch.tensor(
                [scaling[s] for s in seg_s], dtype=torch.float32, device=device
            ),
            max_seg_len=max(seg_l, default=0),
            groups=groups,
            scaling=scaling,
            row_slots=torch.tensor(row_slots, dtype=torch.int64, device=device),
        )


def apply_grouped(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoraBatch
) -> torch.Tensor:
    """``y`` plus each adapter's delta on its rows. ``x [T, in]``, ``y [T, out]``,
    ``a [S, K, in]``, ``b [S, out, K]``. ``y`` is updated in place where it can be."""
    for slot, rows in batch.groups:
        xs = x if rows is None else x.index_select(0, rows)
        delta = (xs @ a[slot].T) @ b[slot].T * batch.scaling[slot]
        if rows is None:
            y = y + delta
        else:
            y = y.index_add(0, rows, delta)
    return y
