"""The TPU backend's Pallas kernels pass the conformance kit in interpret mode on the CPU."""

import pytest
import torch

jax = pytest.importorskip("jax")

from plait.backends.tpu.attention import PallasAttentionBackend  # noqa: E402
from plait.backends.tpu.plugin import TpuBackend  # noqa: E402
from plait.testing import BackendConformance, kit  # noqa: E402
from plait.testing.cases import AttentionCase  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def fast_cpu_compiles():
    # Interpret mode spends its time in XLA's CPU compiler; these kernels need no optimisation.
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


class PallasInterpreted(TpuBackend):
    """The TPU backend with its pool on jax's CPU device and the kernels interpreted; its
    engine (registered by the greedy-parity test) runs the JAX model runner with Pallas
    attention inside the jitted steps."""

    name = "tpu-interpret"
    priority = -100

    @classmethod
    def unavailable_reason(cls):
        return None  # jax's CPU device is always there (this module skips without jax)

    def jax_device(self):
        return jax.devices("cpu")[0]

    def create_attention_backend(self, kv_pool, num_heads, num_kv_heads, head_dim):
        return PallasAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim, interpret=True)

    def attention_impl(self):
        return "pallas"


def pallas_on_cpu() -> PallasInterpreted:
    return PallasInterpreted()


class TestPallasKernelsInterpreted(BackendConformance):
    grid = "quick"
    dtypes = (torch.float32,)  # fp16 and bf16: the cases below (each new shape compiles anew)
    graph_page_sizes = ()  # no torch graph runner: test_tpu_jax_runner.py tests the buckets

    def make_backend(self):
        return pallas_on_cpu()


def test_half_precision_pools():
    kb = pallas_on_cpu()
    kit.check_extend(kb, AttentionCase((33, 0, 3), (1, 20, 9), 6, 2, 64, 16, seed=2), torch.float16)
    kit.check_decode(
        kb, AttentionCase((0, 39, 76), (1, 1, 1), 6, 2, 64, 16, seed=1), torch.bfloat16
    )


def test_long_prefix_spans_many_pages():
    kit.check_extend(
        pallas_on_cpu(), AttentionCase((300,), (37,), 8, 1, 64, 16, seed=3), torch.float32
    )
