"""A backend's switches are options given to its instance (``registry.get_backend(device,
options)``, ``plait.Engine(backend_options=...)``), never class attributes to patch; a switch
a backend does not have is refused, never ignored. ``free_memory_bytes`` answers
``--mem-fraction`` per backend, None meaning unknown."""

import pytest

from plait.backends import registry
from plait.backends.cpu.plugin import CpuBackend, CpuOptions
from plait.core.backend_api import Backend
from plait.server import scheduler_process
from plait.testing import temporarily_registered


class NoSwitches(Backend):
    name = "no-switches"


def test_options_reach_the_instance_and_leave_the_class_alone():
    backend = registry.get_backend("cpu", CpuOptions(native_decode=False))
    assert backend.options.native_decode is False and backend.options.prepack_weights is True
    assert registry.get_backend("cpu", {"greedy_head": False}).options == CpuOptions(
        greedy_head=False
    )
    assert registry.get_backend("cpu").options == CpuOptions()
    assert not hasattr(CpuBackend, "native_decode")


def test_an_unknown_switch_or_a_wrong_type_is_refused_by_name():
    with pytest.raises(ValueError, match="backend_options for the 'cpu' backend.*prepack_weight"):
        registry.get_backend("cpu", {"prepack_weight": False})
    with pytest.raises(ValueError, match="must be CpuOptions, got NoSwitches"):
        CpuBackend(NoSwitches())
    with temporarily_registered(NoSwitches):
        with pytest.raises(ValueError, match="'no-switches' backend has no options"):
            registry.get_backend("no-switches", {"native_decode": False})
        with pytest.raises(ValueError, match="must be none"):
            registry.get_backend("no-switches", CpuOptions())


def test_free_memory_is_measured_by_the_backend_and_unknown_is_refused():
    assert CpuBackend().free_memory_bytes() > 0
    assert NoSwitches().free_memory_bytes() is None
    assert scheduler_process._free_device_gb("cpu") > 0
    with temporarily_registered(NoSwitches):
        with pytest.raises(
            ValueError, match="mem_fraction: cannot measure free memory on 'no-switches'"
        ):
            scheduler_process._free_device_gb("no-switches")
