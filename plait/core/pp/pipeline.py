"""One batch through the pipeline, on every rank: the same micro-batches (``micro``), hidden
states passed rank to rank with ``torch.distributed`` point-to-point sends, the last rank's
logits sent back to rank 0, which samples.

Overlap: sends are non-blocking (``isend``), so a rank starts micro-batch ``k+1`` as soon as it
has sent micro-batch ``k``'s hidden states; with ``n`` ranks and ``n`` micro-batches, rank
``r`` runs micro-batch ``k`` while rank ``r+1`` runs ``k-1`` (GPipe's forward fill). What is not
overlapped: a batch's micro-batches with the next batch (rank 0 needs this batch's logits to
sample before the next decode can start), and a batch of one decode token (one micro-batch).

What holds: every rank runs the micro-batches in order, so a request's earlier piece is in
that rank's KV before a later piece attends to it; every send is waited on before the batch
returns, so its tensor stays alive until delivered; shapes need no header (every rank derives
them from the broadcast batch and the model's config).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from plait.core.forward_batch import ForwardBatch
from plait.core.pp.micro import split_batch
from plait.core.pp.stage import PPStage


def run_stage(
    local: Any, stage: PPStage, batch: ForwardBatch, hidden_size: int, vocab_size: int
) -> torch.Tensor | None:
    """Run ``batch`` through this rank's layers (``local``: the rank's ModelRunner over its
    stage of the model). Rank 0 returns the batch's logits; other ranks return None."""
    micro = split_batch(batch, stage.size)
    pending: list[Any] = []
    try:
        for mb in micro:
            if not stage.first:
                hidden = torch.empty(
                    mb.num_tokens, hidden_size, dtype=_dtype(local), device=local.device
                )
                dist.recv(hidden, stage.rank - 1)
                mb.pp_hidden = hidden
            out = local.run(mb).contiguous()
            if stage.last and out.shape[0] == 0:
                continue  # no logits rows (a prompt chunk): nothing to send
            dst = 0 if stage.last else stage.rank + 1
            pending.append((dist.isend(out, dst), out))
        if not stage.first:
            return None
        logits = []
        for mb in micro:
            rows = torch.empty(
                mb.logits_rows.numel(), vocab_size, dtype=torch.float32, device=local.device
            )
            if rows.shape[0]:
                dist.recv(rows, stage.size - 1)
            logits.append(rows)
        return torch.cat(logits)
    finally:
        for work, _ in pending:
            work.wait()


def _dtype(local: Any) -> torch.dtype:
    return next(local.model.parameters()).dtype


@dataclass(frozen=True, kw_only=True)
class StageFacts:
    """What one pipeline rank holds, read off its built model and pool: its decoder layers
    (``layers``: global ``[start, stop)``), the layers its KV pool holds (``kv_layers``),
    whether it holds the embedding and the LM head, and its weights' bytes."""

    rank: int
    layers: tuple[int, int]
    kv_layers: int
    embedding: bool
    lm_head: bool
    weight_bytes: int

    def to_json(self) -> str:
        import json

        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "StageFacts":
        import json

        d = json.loads(text)
        return cls(**{**d, "layers": tuple(d["layers"])})


def stage_facts(local: Any, stage: PPStage) -> StageFacts:
    from plait.quant.modules import weight_bytes

    model = local.model
    return StageFacts(
        rank=stage.rank,
        layers=(stage.start, stage.start + len(model.layers)),
        kv_layers=int(local.kv_pool.num_layers),
        embedding=model.embed_tokens is not None,
        lm_head=model.lm_head is not None,
        weight_bytes=weight_bytes(model),
    )


class StageRunner:
    """A worker rank's runner (ranks 1..N-1): what the tensor-parallel worker loop calls with
    each broadcast batch."""

    def __init__(self, local: Any, stage: PPStage):
        self.local, self.stage = local, stage
        self.req_pool = local.req_pool
        config = local.model.config
        self.hidden_size, self.vocab_size = config.hidden_size, config.vocab_size

    def run(self, batch: ForwardBatch) -> None:
        run_stage(self.local, self.stage, batch, self.hidden_size, self.vocab_size)
