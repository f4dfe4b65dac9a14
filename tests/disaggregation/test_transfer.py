"""The transfer layer without a model: runs, layouts, the fake transport, Mooncake over TCP."""

from __future__ import annotations

import pytest
import torch

from plait.disaggregation.bootstrap import KVLayout, decode_msg
from plait.disaggregation.transfer import FakeTransfer, TransferError, contiguous_runs
from plait.disaggregation.transports import create_transfer


def test_runs_merge_only_where_both_sides_are_consecutive():
    assert contiguous_runs([5, 6, 7, 9], [1, 2, 3, 4]) == [(5, 1, 3), (9, 4, 1)]
    assert contiguous_runs([1, 2], [8, 3]) == [(1, 8, 1), (2, 3, 1)]
    with pytest.raises(ValueError, match="dst"):
        contiguous_runs([1, 2], [1])


def _copy_via(transfer_a, transfer_b, src_slots, dst_slots, slots=16, buffers=4):
    """Register ``buffers`` K/V-shaped buffers of ``slots`` slots on each side and write the
    source slots into the destination slots; returns both sides' buffers."""
    src = [torch.randn(slots, 2, 4) for _ in range(buffers)]
    dst = [torch.zeros(slots, 2, 4) for _ in range(buffers)]
    for b in src:
        transfer_a.register(b.data_ptr(), b.numel() * 4)
    for b in dst:
        transfer_b.register(b.data_ptr(), b.numel() * 4)
    s, d, n = KVLayout.of(src).writes(KVLayout.of(dst), src_slots, dst_slots)
    transfer_a.write(transfer_b.session_id, s, d, n)
    return src, dst


def test_layout_writes_every_buffer_slot_for_slot():
    src, dst = _copy_via(FakeTransfer(), FakeTransfer(), [3, 4, 5, 9], [1, 2, 7, 8])
    for a, b in zip(src, dst):
        assert torch.equal(b[[1, 2, 7, 8]], a[[3, 4, 5, 9]])
        assert not b[[0, 3, 4, 5, 6]].any()


def test_layouts_of_different_models_are_refused():
    a = KVLayout.of([torch.zeros(4, 2, 4)] * 2)
    with pytest.raises(TransferError, match="layouts differ"):
        a.writes(KVLayout.of([torch.zeros(4, 2, 8)] * 2), [1], [1])


def test_fake_transfer_refuses_unregistered_memory_and_injected_failures():
    a, b = FakeTransfer(), FakeTransfer()
    x = torch.zeros(4)
    with pytest.raises(TransferError, match="not registered"):
        a.write(b.session_id, [x.data_ptr()], [x.data_ptr()], [16])
    a.fail_next = 1
    with pytest.raises(TransferError, match="injected"):
        a.write(b.session_id, [], [], [])


def test_malformed_control_messages_are_dropped():
    assert decode_msg(b"not json") is None
    assert decode_msg(b'{"op": "target"}') is None
    assert decode_msg(b'{"op": "done", "room": 3}') == {"op": "done", "room": 3}


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="disaggregation_transfer_backend"):
        create_transfer("nixl", "127.0.0.1")


def test_mooncake_tcp_write_between_two_engines():
    a, b = create_transfer("mooncake", "127.0.0.1"), create_transfer("mooncake", "127.0.0.1")
    src, dst = _copy_via(a, b, [1, 2, 3], [4, 5, 6])
    for x, y in zip(src, dst):
        assert torch.equal(y[[4, 5, 6]], x[[1, 2, 3]])
    with pytest.raises(TransferError):
        a.write("127.0.0.1:1", [src[0].data_ptr()], [dst[0].data_ptr()], [4])


def test_mooncake_moves_thousands_of_scattered_runs():
    # a radix-cache hit leaves a prompt's slots scattered: one entry per slot per buffer
    a, b = create_transfer("mooncake", "127.0.0.1"), create_transfer("mooncake", "127.0.0.1")
    src_slots = list(range(1, 1000, 2))
    src, dst = _copy_via(a, b, src_slots, list(range(1, 501)), slots=1024, buffers=8)
    for x, y in zip(src, dst):
        assert torch.equal(y[1:501], x[src_slots])


def test_a_worker_rank_writes_its_own_shard_when_rank_0_asks():
    """Tensor parallelism: rank 0 (``RankWriters``) asks a worker rank's ``RankAgent`` over its
    control socket to copy slots of the worker's own KV shard to the matching decode rank;
    a rank table of another length, or a failed write, is an error naming the cause."""
    from types import SimpleNamespace

    from plait.disaggregation.bootstrap import layout_to_json
    from plait.disaggregation.rank_agent import RankAgent, RankWriters

    src = SimpleNamespace(k_buffers=[torch.randn(16, 1, 4)], v_buffers=[torch.randn(16, 1, 4)])
    agent = RankAgent(src, backend="fake", host="127.0.0.1", mode="prefill")
    dst = [torch.zeros(16, 1, 4), torch.zeros(16, 1, 4)]
    peer = FakeTransfer()
    for b in dst:
        peer.register(b.data_ptr(), b.numel() * 4)
    table = [{"session": peer.session_id, "layout": layout_to_json(KVLayout.of(dst))}]
    writers = RankWriters([agent.facts()["control"]])
    try:
        writers.start(table, [1, 2, 3], [9, 10, 4])
        assert writers.wait(5) == 2 * 3 * 16  # K and V, three slots of 16 bytes
        assert torch.equal(dst[0][[9, 10, 4]], src.k_buffers[0][[1, 2, 3]])
        assert torch.equal(dst[1][[9, 10, 4]], src.v_buffers[0][[1, 2, 3]])
        with pytest.raises(TransferError, match="runs 1 tensor-parallel ranks .* server 2"):
            writers.start([], [1], [1])
        writers.start([{**table[0], "session": "fake:nobody"}], [1], [1])
        with pytest.raises(TransferError, match="rank 1: no such peer"):
            writers.wait(5)
    finally:
        writers.close()
        agent.close()
    decode_rank = RankAgent(src, backend="fake", host="127.0.0.1", mode="decode")
    assert decode_rank.facts()["control"] is None  # a decode rank only receives
