"""The checks every backend must pass, as plain functions over a
:class:`~plait.core.backend_api.Backend` object.

The checks build everything through the backend's own factories (``create_kv_pool``,
``create_attention_backend``, ``create_allocator``, ``create_graph_runner``) on its
``torch_device``. To certify kernels on another device than the backend's own (Triton's
interpreter on CPU tensors, say), subclass the backend and override what differs.

Each ``check_*`` raises ``AssertionError`` with the worst mismatch on failure, so the kit works
under pytest, unittest or a script. The reference is ``plait.backends.cpu.attention`` run in
fp32 on the same (dtype-rounded) data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from plait.backends.cpu.attention import decode_attention_ref, extend_attention_ref
from plait.core.backend_api import AttentionBackend, Backend, KVPool
from plait.core.forward_batch import ForwardBatch
from plait.quant.formats import QuantizedWeight, dequantize
from plait.testing.cases import AttentionCase, QuantCase, layout, quant_weight

NUM_LAYERS = 2
LAYER = 1  # check the second layer so a backend that ignores layer_id fails

# (atol, rtol) against an fp32 reference on the same rounded inputs.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (3e-2, 2e-2),
}


def from_registry(name: str) -> Backend:
    """The registered backend ``name``, instantiated as the engine would get it; a
    ``ValueError`` listing every backend (and why) when it cannot run here."""
    from plait.backends import registry

    return registry.get_backend(name)


# -- attention ----------------------------------------------------------------------------------


@dataclass
class _Prepared:
    batch: ForwardBatch
    pool: KVPool
    q: torch.Tensor  # on the backend's device
    k: torch.Tensor  # [S, Hkv, D] fp32 copies of what the pool holds (CPU)
    v: torch.Tensor
    q_ref: torch.Tensor  # fp32, CPU
    req_to_token: torch.Tensor  # CPU copy


def prepare(backend: Backend, case: AttentionCase, dtype: torch.dtype, decode: bool) -> _Prepared:
    """Build the pool (filled with random K/V), the batch and q for ``case`` on ``backend``."""
    lay = layout(case)
    gen = torch.Generator().manual_seed(case.seed)
    pool = backend.create_kv_pool(
        lay.num_slots, NUM_LAYERS, case.num_kv_heads, case.head_dim, dtype, case.page_size
    )
    size = lay.num_slots + case.page_size
    shape = (size, case.num_kv_heads, case.head_dim)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    dev = backend.torch_device
    for layer in range(NUM_LAYERS):
        # Layer 0 holds different data: reading the wrong layer cannot pass by accident.
        kl, vl = (k, v) if layer == LAYER else (-v, k)
        pool.set_kv(layer, torch.arange(size, device=dev), kl.to(dev), vl.to(dev))
    t = sum(case.extend_lens)
    q = torch.randn(t, case.num_heads, case.head_dim, generator=gen).to(dtype)
    rows = torch.cat([torch.arange(p, p + e) for p, e in zip(case.prefix_lens, case.extend_lens)])
    req_rows = torch.repeat_interleave(lay.req_pool_indices, torch.tensor(case.extend_lens))
    out_cache_loc = lay.req_to_token[req_rows, rows].long()

    def i64(xs) -> torch.Tensor:
        return torch.tensor(list(xs), dtype=torch.int64, device=dev)

    batch = ForwardBatch(
        is_decode=decode,
        input_ids=torch.zeros(t, dtype=torch.int64, device=dev),
        positions=rows.to(dev),
        out_cache_loc=out_cache_loc.to(dev),
        req_pool_indices=lay.req_pool_indices.to(dev),
        seq_lens=i64(case.seq_lens),
        prefix_lens=i64(case.prefix_lens),
        extend_lens=i64(case.extend_lens),
        req_to_token=lay.req_to_token.to(dev),
        logits_rows=torch.arange(t, device=dev),
        seq_lens_cpu=list(case.seq_lens),
        prefix_lens_cpu=list(case.prefix_lens),
        extend_lens_cpu=list(case.extend_lens),
    )
    return _Prepared(batch, pool, q.to(dev), k.float(), v.float(), q.float(), lay.req_to_token)


def _assert_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    tolerances: dict[torch.dtype, tuple[float, float]] | None,
    what: str,
) -> None:
    out = torch.as_tensor(out).detach().to("cpu", torch.float32)
    if out.shape != ref.shape:
        raise AssertionError(f"{what}: output shape {tuple(out.shape)} != {tuple(ref.shape)}")
    atol, rtol = (tolerances or TOLERANCES)[dtype]
    bad = ~torch.isclose(out, ref, atol=atol, rtol=rtol)
    if bool(bad.any()):
        err = (out - ref).abs()
        worst = int(err.flatten().nan_to_num(float("inf")).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), out.shape))
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())}/{bad.numel()} elements off (atol={atol}, "
            f"rtol={rtol}); worst at [token/req, head, dim]={idx}: "
            f"got {out[idx]:.6g}, expected {ref[idx]:.6g}"
        )


def _forward_new_tokens(attn: AttentionBackend, p: _Prepared, dtype: torch.dtype) -> torch.Tensor:
    """Through ``AttentionBackend.forward``: the new tokens' slots first hold junk, so the
    backend must write k/v to ``out_cache_loc`` (set_kv) before it attends."""
    loc = p.batch.out_cache_loc
    junk = torch.full((loc.numel(), *p.k.shape[1:]), 100.0, dtype=dtype, device=loc.device)
    p.pool.set_kv(LAYER, loc, junk, junk)
    loc_cpu = loc.cpu()
    k_new = p.k[loc_cpu].to(dtype).to(loc.device)
    v_new = p.v[loc_cpu].to(dtype).to(loc.device)
    return attn.forward(p.q, k_new, v_new, LAYER, p.batch)


def _attention(
    backend: Backend, p: _Prepared, case: AttentionCase, window: int | None
) -> AttentionBackend:
    attn = backend.create_attention_backend(
        p.pool, case.num_heads, case.num_kv_heads, case.head_dim
    )
    if window is not None:  # only the checked layer: a backend must look the window up by id
        attn.set_sliding_windows(tuple(window if i == LAYER else None for i in range(NUM_LAYERS)))
    attn.init_forward_metadata(p.batch)
    return attn


def check_extend(
    backend: Backend,
    case: AttentionCase,
    dtype: torch.dtype,
    tolerances: dict[torch.dtype, tuple[float, float]] | None = None,
    window: int | None = None,
) -> None:
    """``(atol, rtol)`` per dtype come from ``tolerances`` (default :data:`TOLERANCES`).
    ``window``: the checked layer attends through that sliding window (``set_sliding_windows``
    raises ValueError where the backend refuses it)."""
    p = prepare(backend, case, dtype, decode=False)
    attn = _attention(backend, p, case, window)
    out = _forward_new_tokens(attn, p, dtype)
    ref = extend_attention_ref(
        p.q_ref,
        p.k,
        p.v,
        p.req_to_token,
        p.batch.req_pool_indices.tolist(),
        list(case.prefix_lens),
        list(case.extend_lens),
        attn.scale,
        window,
    )
    _assert_close(out, ref, dtype, tolerances, f"extend {case.id} window={window}")


def check_decode(
    backend: Backend,
    case: AttentionCase,
    dtype: torch.dtype,
    tolerances: dict[torch.dtype, tuple[float, float]] | None = None,
    window: int | None = None,
) -> None:
    """As :func:`check_extend`, for one query per request."""
    p = prepare(backend, case, dtype, decode=True)
    attn = _attention(backend, p, case, window)
    out = _forward_new_tokens(attn, p, dtype)
    ref = decode_attention_ref(
        p.q_ref,
        p.k,
        p.v,
        p.req_to_token,
        p.batch.req_pool_indices.cpu(),
        torch.tensor(case.seq_lens),
        attn.scale,
        window,
    )
    _assert_close(out, ref, dtype, tolerances, f"decode {case.id} window={window}")


# -- quantized linear ---------------------------------------------------------------------------

#: (accumulation, output) relative error per dtype of a quantized matmul against the exact
#: product: fp32 sums in any order; fp16/bf16 may also round the dequantized weight (the
#: portable torch default does) and round the output
QUANT_EPS = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}


def weight_on(w: QuantizedWeight, device: torch.device | str) -> QuantizedWeight:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return QuantizedWeight(w.bits, w.group_size, move(w.qs), move(w.scales), move(w.mins))


def assert_quantized_close(y: torch.Tensor, x: torch.Tensor, w: QuantizedWeight, what: str) -> None:
    """``y`` is ``x @ dequantize(w)^T`` in ``x``'s dtype, within ``acc * (|x| @ |W|^T) +
    out * |exact|`` (:data:`QUANT_EPS`), where exact is the float64 product on the CPU."""
    x64, dense = x.detach().cpu().double(), dequantize(weight_on(w, "cpu")).double()
    exact = x64 @ dense.T
    acc, out = QUANT_EPS[x.dtype]
    bound = acc * (x64.abs() @ dense.abs().T) + out * exact.abs() + 1e-6
    if y.shape != exact.shape or y.dtype != x.dtype:
        raise AssertionError(
            f"{what}: got {y.dtype} {tuple(y.shape)}, expected {x.dtype} {tuple(exact.shape)}"
        )
    err = (y.detach().cpu().double() - exact).abs()
    bad = ~(err <= bound)  # NaN counts as bad
    if bool(bad.any()):
        worst = int((err - bound).flatten().nan_to_num(float("inf")).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        raise AssertionError(
            f"{what} ({x.dtype}): {int(bad.sum())}/{bad.numel()} elements off; "
            f"worst at {idx}: got {float(y.flatten()[worst]):.6g}, expected "
            f"{float(exact[idx]):.6g} (bound {float(bound[idx]):.3g})"
        )


def check_quantized_linear(backend: Backend, case: QuantCase, dtype: torch.dtype) -> None:
    """``backend.quantized_linear(case.method)`` on ``torch_device`` equals dequantize-then-
    matmul for ``x[1, m, k]`` (a leading batch dimension, which it must keep)."""
    dev = backend.torch_device
    w = quant_weight(case)
    x = torch.randn(1, case.m, case.k, generator=torch.Generator().manual_seed(case.seed + 1))
    x = x.to(dtype)
    y = backend.quantized_linear(case.method)(x.to(dev), weight_on(w, dev))
    assert_quantized_close(y, x, w, f"quantized linear {case.id}")


# -- allocator ----------------------------------------------------------------------------------


def check_allocator(backend: Backend, page_size: int, num_pages: int = 8) -> None:
    """Invariants of ``TokenSlotAllocator`` as the backend builds it: page 0 is never handed
    out, slots are unique and in range, token i sits at offset i % page_size, a failed alloc
    takes nothing, free gives everything back, and a double free raises ``ValueError``."""
    num_slots = num_pages * page_size
    alloc = backend.create_allocator(num_slots, page_size)
    assert alloc.available_size() == num_slots, "a fresh allocator must have every slot free"

    owned: list[torch.Tensor] = []
    for n in (1, page_size + 1, 2 * page_size - 1):  # grow one request across page boundaries
        last = int(owned[-1][-1]) if owned else -1
        got = alloc.alloc(n, last)
        assert got is not None and got.numel() == n, f"alloc({n}) returned {got}"
        owned.append(got.cpu().long())
    seq = torch.cat(owned)
    assert bool((seq >= page_size).all()), f"page 0 (padding) handed out: {seq.tolist()}"
    assert bool((seq < num_slots + page_size).all()), f"slot out of range: {seq.tolist()}"
    assert seq.unique().numel() == seq.numel(), f"duplicate slots: {seq.tolist()}"
    offsets = seq % page_size
    assert torch.equal(offsets, torch.arange(seq.numel()) % page_size), (
        f"token i must sit at offset i % page_size: {seq.tolist()}"
    )
    used_pages = seq.div(page_size, rounding_mode="floor").unique().numel()
    assert alloc.available_size() == num_slots - used_pages * page_size

    before = alloc.available_size()
    assert alloc.alloc(before + 1) is None, "alloc beyond capacity must return None"
    assert alloc.available_size() == before, "a failed alloc must not take slots"

    other = alloc.alloc(before)  # take everything that is left
    assert other is not None and other.numel() == before
    assert not set(other.cpu().tolist()) & set(seq.tolist()), "a slot was handed out twice"
    assert alloc.available_size() == 0

    dev_seq = seq.to(other.device)
    alloc.free(dev_seq)
    alloc.free(other)
    assert alloc.available_size() == num_slots, "free must return every page"
    try:
        alloc.free(dev_seq)
    except ValueError:
        pass
    else:
        raise AssertionError("a double free must raise ValueError")
    again = alloc.alloc(num_slots)
    assert again is not None and again.numel() == num_slots, "freed pages must be reusable"


# -- graph capture ------------------------------------------------------------------------------


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
