"""Certify the toy backend with Plait's conformance kit, and run a real Engine on it."""

import pytest

from plait.testing import BackendConformance, make_tiny_llama
from plait.testing.e2e import engine_available, greedy_output_ids


class TestToyBackend(BackendConformance):
    device = "toy"


def test_engine_generates_on_the_toy_device(tmp_path):
    if not engine_available():
        pytest.skip("plait.Engine is not available")
    from plait_toy.attention import CALLS

    model_dir = make_tiny_llama(tmp_path / "tiny")
    CALLS.clear()
    out = greedy_output_ids("toy", model_dir, max_new_tokens=4)
    assert all(len(ids) == 4 for ids in out)
    assert CALLS["extend"] > 0 and CALLS["decode"] > 0, "the toy attention never ran"
