"""The graph-capture check of the backend kit: decode captured for fixed batch sizes must
replay exactly what eager decode computes, over a toy decoder whose one attention layer runs
the backend's own kernels (see :mod:`plait.testing.kit`)."""

from __future__ import annotations

from typing import Any

import torch

from plait.core.backend_api import AttentionBackend, Backend
from plait.core.forward_batch import ForwardBatch
from plait.testing.kit_constants import LAYER, NUM_LAYERS


class ToyDecoder(torch.nn.Module):
    """A one-layer decode step whose q/k/v are fixed functions of (token id, position), so an
    eager run and a graph replay of the same batch must agree exactly and write the same K/V."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        vocab: int = 97,
        max_pos: int = 512,
        seed: int = 0,
    ):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.shapes = (num_heads, num_kv_heads, head_dim)
        self.tok = torch.randn(vocab, (num_heads + 2 * num_kv_heads) * head_dim, generator=g)
        self.pos = torch.randn(max_pos, (num_heads + 2 * num_kv_heads) * head_dim, generator=g)

    def to_device(self, device: torch.device, dtype: torch.dtype) -> "ToyDecoder":
        self.tok, self.pos = self.tok.to(device, dtype), self.pos.to(device, dtype)
        return self

    def qkv(self, input_ids: torch.Tensor, positions: torch.Tensor):
        hq, hkv, d = self.shapes
        x = self.tok[input_ids] + self.pos[positions]
        q, k, v = x.split([hq * d, hkv * d, hkv * d], dim=-1)
        return q.view(-1, hq, d), k.view(-1, hkv, d), v.view(-1, hkv, d)

    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        attn.init_forward_metadata(batch)  # as the real models do, once per forward
        q, k, v = self.qkv(batch.input_ids, batch.positions)
        return attn.forward(q, k, v, LAYER, batch)


def check_graph_replay(
    backend: Backend,
    dtype: torch.dtype = torch.float32,
    page_size: int = 16,
    max_batch_size: int = 8,
    steps: int = 3,
) -> bool:
    """Replays of the backend's decode graphs equal eager runs, for batch sizes that need
    padding, across steps whose lengths grow; padded rows write only to the padding page.
    Returns False (nothing checked) when the backend runs decode eagerly."""
    hq, hkv, d = 4, 2, 64
    model = ToyDecoder(hq, hkv, d).to_device(backend.torch_device, dtype)
    runner = backend.create_graph_runner(model, max_batch_size)
    if runner is None:
        return False
    dev, num_reqs, max_ctx = backend.torch_device, max_batch_size, 64
    num_slots = num_reqs * max_ctx
    pool = backend.create_kv_pool(num_slots, NUM_LAYERS, hkv, d, dtype, page_size)
    attn = backend.create_attention_backend(pool, hq, hkv, d)
    # Request r (table row r + 1) owns the page-aligned stretch of slots starting at
    # page_size + r * max_ctx. Row 0 is the padding row. Prefill K/V are random.
    r2t = torch.zeros(num_reqs + 1, max_ctx, dtype=torch.int32)
    for r in range(num_reqs):
        r2t[r + 1] = torch.arange(max_ctx, dtype=torch.int32) + page_size + r * max_ctx
    r2t = r2t.to(dev)
    gen = torch.Generator().manual_seed(7)
    size = num_slots + page_size
    pool.set_kv(
        LAYER,
        torch.arange(size, device=dev),
        torch.randn(size, hkv, d, generator=gen).to(dtype).to(dev),
        torch.randn(size, hkv, d, generator=gen).to(dtype).to(dev),
    )
    lens = [5 + 3 * r for r in range(num_reqs)]
    run = lambda b: model(b, attn)  # noqa: E731
    everyone = list(range(num_reqs))
    for step in range(steps):
        # An eager pass over every request before and after this step's replays: if a padded
        # row wrote anywhere but the padding page, some request's attention changes.
        probe = run(_decode_batch(everyone, [lens[r] for r in everyone], r2t, step, dev))
        sizes = (3, 1, max_batch_size, max(1, max_batch_size - 1))
        for j, bs in enumerate(sizes):  # sizes padding to the same graph, with other requests
            reqs = [(step + j + i) % num_reqs for i in range(bs)]
            batch = _decode_batch(reqs, [lens[r] for r in reqs], r2t, step, dev)
            eager = _cpu(run(batch))
            replayed = _cpu(runner.replay(batch, run))
            what = f"graph replay (step {step}, batch {bs})"
            if replayed.shape != eager.shape:
                raise AssertionError(
                    f"{what}: shape {tuple(replayed.shape)} != {tuple(eager.shape)}"
                )
            if not torch.allclose(replayed, eager, atol=1e-5, rtol=1e-5):
                raise AssertionError(f"{what}: max diff {(replayed - eager).abs().max():.3g}")
        after = run(_decode_batch(everyone, [lens[r] for r in everyone], r2t, step, dev))
        if not torch.equal(_cpu(after), _cpu(probe)):
            raise AssertionError(
                f"graph replay (step {step}) changed K/V outside the padding "
                "page: padded rows must write slot 0 only"
            )
        lens = [n + 1 for n in lens]
    return True


def _cpu(x: Any) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float32)


def _decode_batch(
    reqs: list[int], pos: list[int], r2t: torch.Tensor, step: int, dev: torch.device
) -> ForwardBatch:
    def i64(xs) -> torch.Tensor:
        return torch.tensor(list(xs), dtype=torch.int64, device=dev)

    rows = i64(r + 1 for r in reqs)
    slots = r2t[rows, i64(pos)].long()
    seq = [p + 1 for p in pos]
    return ForwardBatch(
        is_decode=True,
        input_ids=i64((7 * r + step) % 97 for r in reqs),
        positions=i64(pos),
        out_cache_loc=slots,
        req_pool_indices=rows,
        seq_lens=i64(seq),
        prefix_lens=i64(pos),
        extend_lens=i64([1] * len(reqs)),
        req_to_token=r2t,
        logits_rows=torch.arange(len(reqs), device=dev),
        seq_lens_cpu=seq,
        prefix_lens_cpu=list(pos),
        extend_lens_cpu=[1] * len(reqs),
    )
