"""Speculative decoding's verify pass through the CUDA/ROCm backend's Triton extend kernel,
under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py): greedy output equals the
same backend's without speculation, token for token."""

import os

import pytest

import plait
from plait.core.spec.cost import PassCost

pytest.importorskip("triton")

from tests.backends.test_triton_kernels import TritonInterpreted  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 (CPU-only machine)",
)


@pytest.mark.slow  # about a minute under the interpreter
def test_verify_pass_through_the_triton_extend_kernel_keeps_greedy_output(make_tiny_model):
    from plait.testing.register import temporarily_registered

    path = make_tiny_model("llama")
    prompts = [[11, 12, 13, 14, 15, 16] * 4, [40, 41, 42] * 7 + [43]]
    sp = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
    with temporarily_registered(TritonInterpreted) as name:
        kw = {"device": name, "dtype": "float32", "max_total_tokens": 1024}
        with plait.Engine(path, **kw) as engine:
            want = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=sp)]
        with plait.Engine(path, speculative_algorithm="NGRAM", **kw) as engine:
            assert not engine.scheduler.verify_as_decode  # the extend kernel verifies
            # no cost cap: every draft verified (a fit from passes timed at start-up, e.g.
            # the warm-up's, would cap drafts by the interpreter's timings)
            engine.scheduler.output.observe_pass = None
            engine.scheduler.spec.cost = PassCost()
            first = engine.generate(input_ids=prompts, sampling_params=sp)
            again = engine.generate(input_ids=prompts, sampling_params=sp)  # radix drafts
            info = engine.get_server_info()
    assert [o["output_ids"] for o in first] == want
    assert [o["output_ids"] for o in again] == want
    assert info["spec_verify_passes"] > 0 and info["spec_accepted_tokens"] >= 10
