"""The kit itself: the CPU backend passes it, its grids cover what they promise, and it catches
broken backends."""

import pytest
import torch

from plait.backends.cpu.attention import TorchAttentionBackend
from plait.backends.cpu.plugin import CpuBackend
from plait.testing import BackendConformance, kit
from plait.testing.cases import AttentionCase, decode_cases, extend_cases, layout


class TestCpuBackend(BackendConformance):
    device = "cpu"
    engine_kwargs = None  # cpu vs cpu parity says nothing


def test_full_grid_covers_the_promised_ranges():
    for cases in (extend_cases("full"), decode_cases("full")):
        assert {c.batch_size for c in cases} >= {1, 32}
        assert max(max(c.prefix_lens) for c in cases) >= 2000
        assert min(min(c.prefix_lens) for c in cases) == 0
        assert {c.num_heads // c.num_kv_heads for c in cases} == {1, 3, 8}
        assert {c.head_dim for c in cases} == {64, 128}
        assert {c.page_size for c in cases} == {1, 16}
    with pytest.raises(ValueError, match="grid"):
        extend_cases("huge")


def test_layout_is_paged_like_the_allocator():
    case = AttentionCase((5, 40), (3, 1), 4, 4, 64, 16, seed=3)
    lay = layout(case)
    for b, seq in enumerate(case.seq_lens):
        slots = lay.req_to_token[lay.req_pool_indices[b], :seq].long()
        assert bool((slots >= 16).all()), "page 0 is padding"
        assert torch.equal(slots % 16, torch.arange(seq) % 16)
    used = torch.cat(
        [lay.req_to_token[r, :s].long() for r, s in zip(lay.req_pool_indices, case.seq_lens)]
    )
    assert used.unique().numel() == used.numel()


def backend(attention_cls) -> CpuBackend:
    class Broken(CpuBackend):
        name = "broken"

        def create_attention_backend(self, pool, hq, hkv, d):
            return attention_cls(pool, hq, hkv, d)

    return Broken()


class IgnoresLayer(TorchAttentionBackend):
    def forward_extend(self, q, layer_id, batch):
        return super().forward_extend(q, 0, batch)


class NotCausal(TorchAttentionBackend):
    def forward_extend(self, q, layer_id, batch):
        out = super().forward_extend(q, layer_id, batch)
        return out.roll(1, dims=0)


class SkipsWrite(TorchAttentionBackend):
    def forward(self, q, k, v, layer_id, batch):
        return self.forward_decode(q, layer_id, batch)


@pytest.mark.parametrize("cls", [IgnoresLayer, NotCausal])
def test_extend_check_catches_a_wrong_backend(cls):
    with pytest.raises(AssertionError, match="elements off"):
        kit.check_extend(backend(cls), AttentionCase((3,), (9,), 4, 2, 64, 1), torch.float32)


def test_decode_check_catches_a_backend_that_never_writes_the_new_kv():
    with pytest.raises(AssertionError, match="elements off"):
        kit.check_decode(
            backend(SkipsWrite), AttentionCase((7, 2), (1, 1), 4, 2, 64, 1), torch.float32
        )
