"""The NPU backend casts Linear weights to the fractal NZ layout at load (``npu/nz.py``), checked
through the real NPU backend class on CPU tensors with a torch_npu stand-in that records its
``npu_format_cast`` calls (never run on Ascend hardware)."""

import sys

import pytest
from torch import nn

import plait
from plait.backends.npu.nz import ACL_FORMAT_FRACTAL_NZ, cast_linear_weights_to_nz, import_torch_npu
from plait.testing.register import temporarily_registered
from tests.backends.npu_standin import NpuStandIn, torch_npu_standin

GREEDY = {"max_new_tokens": 4, "temperature": 0}


def linear_weight_ptrs(model: nn.Module) -> set[int]:
    return {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Linear)}


def casts(standin) -> list[tuple[int, int]]:
    return [args for op, args in standin.calls if op == "npu_format_cast"]


def test_every_linear_weight_is_cast_once_at_load(monkeypatch, make_tiny_model):
    standin = torch_npu_standin()
    monkeypatch.setattr(NpuStandIn, "standin", standin)
    path = make_tiny_model()
    with temporarily_registered(NpuStandIn) as name:
        with plait.Engine(path, device=name, dtype="float32", max_total_tokens=256) as engine:
            model = engine.scheduler.runner.model
            done = casts(standin)
            # cast at load, before any request
            assert done and all(fmt == ACL_FORMAT_FRACTAL_NZ for _, fmt in done)
            ptrs = [p for p, _ in done]
            assert len(ptrs) == len(set(ptrs)) and set(ptrs) == linear_weight_ptrs(model)
            out = engine.generate(input_ids=[[5, 17, 300]], sampling_params=GREEDY)
            assert len(out[0]["output_ids"]) == 4
            assert casts(standin) == done  # nothing again after load


def test_nothing_is_cast_when_disabled(monkeypatch, make_tiny_model):
    standin = torch_npu_standin()
    monkeypatch.setattr(NpuStandIn, "standin", standin)
    with temporarily_registered(NpuStandIn) as name:
        with plait.Engine(
            make_tiny_model(),
            device=name,
            dtype="float32",
            max_total_tokens=256,
            backend_options={"enable_nz": False},
        ):
            pass
    assert casts(standin) == []


def test_shared_and_tied_weights():
    """A weight two Linears share is cast once; one an Embedding also reads (a tied lm_head)
    is not cast at all."""
    standin = torch_npu_standin()
    embed, head, shared = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False), nn.Linear(4, 4)
    head.weight = embed.weight
    again = nn.Linear(4, 4)
    again.weight = shared.weight
    model = nn.ModuleList([embed, head, shared, again, nn.Linear(4, 3)])
    assert cast_linear_weights_to_nz(model, standin) == 2
    ptrs = sorted(p for p, _ in casts(standin))
    assert ptrs == sorted([shared.weight.data_ptr(), model[4].weight.data_ptr()])


def test_nothing_is_cast_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # importing it raises ImportError
    assert import_torch_npu() is None
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    before = [m.weight.data_ptr() for m in model]
    assert cast_linear_weights_to_nz(model, import_torch_npu()) == 0
    assert [m.weight.data_ptr() for m in model] == before


def test_unknown_backend_option_is_refused(make_tiny_model):
    with pytest.raises(ValueError, match="backend_options for the 'npu-standin' backend"):
        with temporarily_registered(NpuStandIn) as name:
            plait.Engine(make_tiny_model(), device=name, backend_options={"enable_zn": True})
