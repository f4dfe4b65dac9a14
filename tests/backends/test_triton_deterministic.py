"""The Triton backends' batch-invariant kernels (``plait.backends.cuda.deterministic``) under
the interpreter (TRITON_INTERPRET=1): a row's result is bit-identical whatever shares its
launch, and in the engine a request's logprobs do not depend on its batch."""

import os

import pytest
import torch

import plait

pytest.importorskip("triton")

from plait.backends.cuda.deterministic import invariant_linear, invariant_rms_norm  # noqa: E402
from tests.backends.test_triton_kernels import TritonInterpreted  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 (CPU-only machine: the kernels run under the interpreter)",
)


@pytest.mark.parametrize("rows", [1, 3, 17, 64])
def test_linear_and_norm_rows_do_not_depend_on_the_others(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(200, 96, generator=g)
    b = torch.randn(200, generator=g)
    x = torch.randn(1, 96, generator=g)
    batch = torch.randn(rows, 96, generator=g) * 10
    pos = rows // 2
    batch[pos] = x[0]
    assert torch.equal(invariant_linear(batch, w, b)[pos], invariant_linear(x, w, b)[0])
    assert torch.allclose(invariant_linear(x, w, b), x @ w.T + b, atol=1e-4)
    nw = torch.randn(96, generator=g)
    assert torch.equal(invariant_rms_norm(batch, nw, 1e-5)[pos], invariant_rms_norm(x, nw, 1e-5)[0])


@pytest.mark.slow  # the interpreter runs every program in numpy
def test_engine_logprobs_are_batch_invariant(make_tiny_model):
    """A small vocabulary keeps the interpreted LM head short; the scenario is the CPU test's
    in miniature: alone, in a batch of 3 at position 1, chunked, after a cache hit."""
    from plait.testing.register import temporarily_registered
    from tests.core.test_deterministic import logprobs

    target = list(range(100, 140))
    others = [list(range(300, 317)), target[:20] + [5, 6, 7]]
    sp = dict(max_new_tokens=4, temperature=0, ignore_eos=True)

    def run(engine, ids, pos):
        outs = engine.generate(input_ids=ids, sampling_params=sp, return_logprob=True)
        return logprobs(outs[pos])

    with temporarily_registered(TritonInterpreted) as name:
        with plait.Engine(
            make_tiny_model("llama", vocab_size=512),
            device=name,
            dtype="float32",
            max_total_tokens=1024,
            chunked_prefill_size=16,
            disable_graph_capture=True,
            enable_deterministic_inference=True,
        ) as engine:
            assert type(engine.scheduler.runner.attn).__name__ == "DeterministicTritonAttention"
            alone = run(engine, [target], 0)
            engine.flush_cache()
            batched = run(engine, [others[0], target, others[1]], 1)
            cached = run(engine, [target], 0)  # the whole prompt is in the cache now
    assert torch.equal(alone, batched) and torch.equal(alone, cached)
