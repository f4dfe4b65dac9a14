"""A ready-made conformance test module for ``--plait-device`` (see :mod:`plait.testing.plugin`).

pytest -p plait.testing.plugin --pyargs plait.testing.suite --plait-device mydevice
"""

from __future__ import annotations

import pytest

from plait.testing.conformance import BackendConformance


class TestSelectedDevice(BackendConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, request):
        suite = cls()
        suite.device = request.config.getoption("plait_device", default=None)
        return suite.make_backend()
