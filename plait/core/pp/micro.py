"""Cut one forward batch into micro-batches, so pipeline ranks work on different parts of it
at once (rank 1 runs micro-batch 0's layers while rank 0 runs micro-batch 1's).

The cut is by tokens: micro-batch ``k`` holds tokens ``T*k//n .. T*(k+1)//n`` of the batch,
so the ranks' work is balanced whatever the requests' lengths. A request whose new tokens
straddle a cut is split into pieces, each an extend of its own (prefix = the tokens before
it), exactly as chunked prefill splits a prompt: every rank runs the micro-batches in order,
so a piece's earlier tokens are in that rank's KV pool before the piece attends to them. A
decode batch has one token per request, so its cuts fall between requests.

Every rank computes the same cuts from the same broadcast batch; micro-batch ``k``'s logits
rows are the batch's rows that fall in its tokens, in order, so concatenating the
micro-batches' logits gives the batch's.
"""

from __future__ import annotations

from itertools import accumulate

import torch

from plait.core.forward_batch import ForwardBatch


def split_batch(batch: ForwardBatch, parts: int) -> list[ForwardBatch]:
    """``batch`` as at most ``parts`` micro-batches (fewer when it has fewer tokens)."""
    if batch.lora_ids is not None:
        raise ValueError("lora_paths: LoRA adapters do not support pipeline parallelism")
    total = batch.num_tokens
    parts = max(1, min(parts, total))
    if parts == 1:
        return [batch]
    cuts = [total * k // parts for k in range(parts + 1)]
    return [_slice(batch, lo, hi) for lo, hi in zip(cuts, cuts[1:])]


def _slice(batch: ForwardBatch, lo: int, hi: int) -> ForwardBatch:
    """Tokens ``lo..hi`` of ``batch`` as a batch of their own."""
    ends = list(accumulate(batch.extend_lens_cpu))
    idx: list[int] = []
    prefix: list[int] = []
    extend: list[int] = []
    for i, end in enumerate(ends):
        start = end - batch.extend_lens_cpu[i]
        a, b = max(start, lo), min(end, hi)
        if a >= b:
            continue
        idx.append(i)
        prefix.append(batch.prefix_lens_cpu[i] + a - start)
        extend.append(b - a)
    seq = [p + e for p, e in zip(prefix, extend)]
    rows = batch.logits_rows
    rows = rows[(rows >= lo) & (rows < hi)] - lo
    device = batch.input_ids.device

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    return ForwardBatch(
        is_decode=batch.is_decode,
        input_ids=batch.input_ids[lo:hi],
        positions=batch.positions[lo:hi],
        out_cache_loc=batch.out_cache_loc[lo:hi],
        req_pool_indices=batch.req_pool_indices[tensor(idx)],
        seq_lens=tensor(seq),
        prefix_lens=tensor(prefix),
        extend_lens=tensor(extend),
        req_to_token=batch.req_to_token,
        logits_rows=rows,
        seq_lens_cpu=seq,
        prefix_lens_cpu=prefix,
        extend_lens_cpu=extend,
        greedy_only=batch.greedy_only,
    )
