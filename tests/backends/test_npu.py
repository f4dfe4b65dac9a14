"""The NPU backend on machines without torch_npu (every CI machine): detection says why, the
plugin still registers, and resolution fails with that reason. The FIA call's arguments are
checked against a CPU stand-in that implements the op's documented semantics."""

import importlib.util
import itertools
import sys
import types

import pytest
import torch

from plait.backends import registry
from plait.backends.cpu.plugin import CpuBackend
from plait.backends.npu import plugin as npu_plugin
from plait.backends.npu.attention import AscendAttentionBackend, fia_supported
from plait.backends.npu.plugin import NpuBackend
from plait.testing import kit
from plait.testing.cases import AttentionCase


@pytest.fixture
def no_torch_npu(monkeypatch):
    """torch_npu is absent here anyway; this makes it absent on an Ascend machine too."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torch_npu" else real_find_spec(name, *a),
    )


def test_detection_without_torch_npu_reports_it_missing(no_torch_npu):
    info = NpuBackend.info()
    assert (info.name, info.priority, info.available) == ("npu", 70, False)
    assert info.reason == "torch_npu not installed"


def test_npu_is_registered_and_resolving_it_names_the_reason():
    infos = registry.available_backends()
    assert "npu" in infos and not infos["npu"].available
    with pytest.raises(ValueError, match="torch_npu not installed") as e:
        registry.resolve_device("npu")
    assert "cpu" in str(e.value) and "cuda" in str(e.value)  # the listing of every backend


def test_detection_with_torch_npu_but_no_device(monkeypatch):
    fake = types.ModuleType("torch_npu")
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.setattr(npu_plugin.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(
        torch, "npu", types.SimpleNamespace(is_available=lambda: False), raising=False
    )
    info = NpuBackend.info()
    assert not info.available and "no Ascend NPU" in info.reason


def test_detection_survives_a_broken_torch_npu(monkeypatch):
    monkeypatch.setattr(npu_plugin.importlib.util, "find_spec", lambda name, *a: object())

    def broken(name, *a, **k):
        raise OSError("libascendcl.so: cannot open shared object file")

    monkeypatch.setattr(npu_plugin.importlib, "import_module", broken)
    info = NpuBackend.info()
    assert not info.available and "libascendcl" in info.reason


# -- FIA stand-in -------------------------------------------------------------------------------


def fake_fia(
    query,
    key,
    value,
    *,
    block_table,
    input_layout,
    block_size,
    actual_seq_lengths,
    actual_seq_lengths_kv,
    num_heads,
    num_key_value_heads,
    scale,
    sparse_mode=0,
    atten_mask=None,
):
    """CPU stand-in for torch_npu.npu_fused_infer_attention_score, paged TND mode, as
    documented: cumulative query ends, per-request KV lengths, block ids in block_table,
    sparse_mode 3 = causal aligned to the bottom right."""
    assert input_layout == "TND" and key.shape[1] == block_size
    assert sparse_mode in (0, 3) and (atten_mask is not None) == (sparse_mode == 3)
    head_dim = query.shape[-1]
    out = torch.empty_like(query)
    starts = [0, *actual_seq_lengths[:-1]]
    for b, (s, e, kv_len) in enumerate(zip(starts, actual_seq_lengths, actual_seq_lengths_kv)):
        blocks = block_table[b, : -(-kv_len // block_size)].long()
        k = key[blocks].reshape(-1, num_key_value_heads, head_dim)[:kv_len].float()
        v = value[blocks].reshape(-1, num_key_value_heads, head_dim)[:kv_len].float()
        q = query[s:e].float()
        group = num_heads // num_key_value_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if sparse_mode == 3:
            n = e - s
            visible = torch.arange(kv_len)[None, :] <= (kv_len - n + torch.arange(n))[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(query.dtype)
    return out, None


class NpuOnCpu(CpuBackend):
    """The NPU attention on CPU tensors, calling ``fia`` in place of torch_npu's op."""

    name = "npu-standin"

    def __init__(self, fia=fake_fia):
        super().__init__()
        self.torch_npu = types.SimpleNamespace(npu_fused_infer_attention_score=fia)

    def create_attention_backend(self, pool, hq, hkv, d):
        return AscendAttentionBackend(pool, hq, hkv, d, torch_npu=self.torch_npu)


def npu_on_cpu() -> NpuOnCpu:
    return NpuOnCpu()


CASES = [
    AttentionCase((0, 19), (17, 5), 4, 4, 64, 16, seed=1),
    AttentionCase((33, 0, 3), (1, 20, 9), 6, 2, 64, 16, seed=2),
    AttentionCase((40,), (18,), 8, 1, 128, 32, seed=3),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_fia_arguments_follow_the_paged_tnd_contract(case, dtype):
    kb = npu_on_cpu()
    kit.check_extend(kb, case, dtype)
    decode = AttentionCase(
        case.seq_lens,
        (1,) * case.batch_size,
        case.num_heads,
        case.num_kv_heads,
        case.head_dim,
        case.page_size,
        case.seed,
    )
    kit.check_decode(kb, decode, dtype)


def test_unsupported_configurations_fall_back_to_the_reference():
    assert not fia_supported(torch.float32, 16) and not fia_supported(torch.float16, 1)
    calls = []

    def spy(*a, **k):
        calls.append(1)
        return fake_fia(*a, **k)

    kb = NpuOnCpu(fia=spy)
    for case, dtype in itertools.product(CASES[:1], (torch.float32,)):
        kit.check_extend(kb, case, dtype)
    kit.check_extend(kb, AttentionCase((3,), (5,), 4, 4, 64, 1), torch.float16)
    assert not calls
