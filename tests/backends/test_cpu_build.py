"""The CPU backend's C++ builds (plait.backends.cpu.cpp_build)."""
from __future__ import annotations

import os
import shutil

import pytest

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                reason="no C++ compiler on this machine to build the kernels")


def test_make_kernels_builds_every_cpu_source():
    """``make kernels`` (``python -m plait.backends.cpu.cpp_build``) builds ahead what the CPU
    backend would otherwise compile on the first server start: every source beside it."""
    from pathlib import Path

    from plait.backends.cpu import cpp_build
    here = Path(cpp_build.__file__).parent
    assert set(cpp_build.SOURCES) == {p.name for p in here.glob("*.cpp")}
    assert cpp_build.build_all() == []
