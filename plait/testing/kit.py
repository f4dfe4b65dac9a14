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

import torch

from plait.backends.cpu.attention import decode_attention_ref, extend_attention_ref
from plait.core.backend_api import AttentionBackend, Backend, KVPool
from plait.core.forward_batch import ForwardBatch
from plait.quant.formats import QuantizedWeight, dequantize
from plait.testing.cases import AttentionCase, QuantCase, layout, quant_weight

from plait.testing.kit_constants import LAYER, NUM_LAYERS

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
