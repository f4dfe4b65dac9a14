"""Rank 0 sends each step's ForwardBatch to the other ranks: two broadcasts per step.

A fixed-size int64 header (command and sizes) goes first, then one int64 payload holding the
batch's tensors back to back and the ``req_to_token`` rows of the batch's requests (the only
rows this forward reads; the workers copy them into their own table, so their tables never
need any other update). Host lists (``seq_lens_cpu``...) are rebuilt from the tensors.

Payload layout, with T tokens, B requests, R logits rows and L table columns:
``input_ids[T] positions[T] out_cache_loc[T] req_pool_indices[B] seq_lens[B] prefix_lens[B]
extend_lens[B] logits_rows[R] req_to_token_rows[B*L]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from plait.core.forward_batch import ForwardBatch

FORWARD, STOP = 1, 2
_HEADER = 6  # command, is_decode, T, B, R, L


def send_stop(device: torch.device) -> None:
    dist.broadcast(torch.tensor([STOP, 0, 0, 0, 0, 0], dtype=torch.int64, device=device), 0)


def send_batch(batch: ForwardBatch) -> None:
    """Broadcast ``batch`` from rank 0 (its slots already written to ``req_to_token``)."""
    t, b, r = batch.input_ids.numel(), batch.batch_size, batch.logits_rows.numel()
    cols = max(batch.seq_lens_cpu)
    rows = batch.req_to_token[batch.req_pool_indices, :cols].to(torch.int64)
    device = batch.input_ids.device
    dist.broadcast(
        torch.tensor(
            [FORWARD, int(batch.is_decode), t, b, r, cols], dtype=torch.int64, device=device
        ),
        0,
    )
    payload = torch.cat(
        [
            batch.input_ids,
            batch.positions,
            batch.out_cache_loc,
            batch.req_pool_indices,
            batch.seq_lens,
            batch.prefix_lens,
            batch.extend_lens,
            batch.logits_rows,
            rows.flatten(),
        ]
    ).to(torch.int64)
    dist.broadcast(payload, 0)


def recv_batch(req_to_token: torch.Tensor) -> ForwardBatch | None:
    """On ranks > 0: the next batch (its rows copied into ``req_to_token``), or None when rank
    0 sent STOP."""
    device = req_to_token.device
    header = torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.broadcast(header, 0)
    command, is_decode, t, b, r, cols = header.tolist()
    if command == STOP:
        return None
    if command != FORWARD:
        raise RuntimeError(f"tensor-parallel channel: unknown command {command}")
    payload = torch.empty(3 * t + 4 * b + r + b * cols, dtype=torch.int64, device=device)
    dist.broadcast(payload, 0)
    (ids, pos, loc, idx, seq, prefix, ext, logits_rows, rows) = payload.split(
        [t, t, t, b, b, b, b, r, b * cols]
    )
    req_to_token[idx, :cols] = rows.view(b, cols).to(req_to_token.dtype)
    return ForwardBatch(
        is_decode=bool(is_decode),
        input_ids=ids,
        positions=pos,
        out_cache_loc=loc,
        req_pool_indices=idx,
        seq_lens=seq,
        prefix_lens=prefix,
        extend_lens=ext,
        req_to_token=req_to_token,
        logits_rows=logits_rows,
        seq_lens_cpu=seq.tolist(),
        prefix_lens_cpu=prefix.tolist(),
        extend_lens_cpu=ext.tolist(),
    )
