"""pytest plugin for the conformance kit: ``pytest -p plait.testing.plugin``.

Adds ``--plait-device NAME`` (runs :class:`~plait.testing.conformance.BackendConformance`
against a registered device with no test file of your own:
``pytest -p plait.testing.plugin --pyargs plait.testing.suite --plait-device mydevice``) and
``--plait-kit-grid quick|full``.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("plait", "plait backend conformance kit")
    group.addoption(
        "--plait-device",
        default=None,
        help="registered backend name to certify with plait.testing.suite",
    )
    group.addoption(
        "--plait-kit-grid",
        default=None,
        choices=("quick", "full"),
        help="attention shape grid: quick (CI, interpreters) or full (hardware)",
    )


@pytest.fixture(scope="session")
def plait_device(request: pytest.FixtureRequest) -> str | None:
    return request.config.getoption("plait_device")
