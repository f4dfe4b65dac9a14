"""A MoE model end to end on the CUDA/ROCm backend's kernels under Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py): the engine's sparse layers run the Triton fused-MoE
kernel (``TritonBackend.fused_moe``) and the greedy tokens are transformers', batched, with
chunked prefill and after prefix-cache hits."""

import os

import pytest

import plait

pytest.importorskip("triton")

from plait.backends.cuda.fused_moe import fused_experts_triton  # noqa: E402
from tests.backends.test_triton_kernels import TritonInterpreted  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 (CPU-only machine)",
)


@pytest.mark.slow  # minutes under the interpreter on a loaded 2-core machine
def test_mixtral_greedy_matches_transformers_on_the_triton_kernels(make_tiny_model):
    from plait.testing.register import temporarily_registered
    from tests.models.test_moe_models import PROMPTS, generate_twice, hf_expected, tiny_moe

    path = tiny_moe(make_tiny_model, "mixtral")
    prompts = [PROMPTS[0], PROMPTS[3]]  # the interpreter runs every program in numpy
    want = hf_expected(path, prompts)
    with temporarily_registered(TritonInterpreted) as name:
        with plait.Engine(
            path, device=name, dtype="float32", max_total_tokens=2048, chunked_prefill_size=16
        ) as engine:
            model = engine.scheduler.runner.model
            assert all(layer.mlp.experts.op is fused_experts_triton for layer in model.layers)
            assert generate_twice(engine, prompts) == want
