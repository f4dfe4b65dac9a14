"""The TPU backend's Pallas kernels pass the conformance kit in interpret mode on the CPU."""
import pytest
import torch

jax = pytest.importorskip("jax")

from plait.backends.cuda.graph_runner import DecodeGraphRunner  # noqa: E402
from plait.backends.tpu.attention import JaxKVPool, PallasAttentionBackend  # noqa: E402
from plait.backends.tpu.graph import JitBucketCapture  # noqa: E402
from plait.core.memory import TokenSlotAllocator  # noqa: E402
from plait.testing import BackendConformance, kit  # noqa: E402
from plait.testing.cases import AttentionCase  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def fast_cpu_compiles():
    # Interpret mode spends its time in XLA's CPU compiler; these kernels need no optimisation.
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def pallas_on_cpu() -> kit.KitBackend:
    jax_cpu = jax.devices("cpu")[0]
    return kit.KitBackend(
        name="tpu-interpret", device=CPU,
        make_kv_pool=lambda n, layers, hkv, d, dtype, ps: JaxKVPool(n, layers, hkv, d, dtype, ps,
                                                                   jax_cpu),
        make_attention=lambda pool, hq, hkv, d: PallasAttentionBackend(pool, hq, hkv, d,
                                                                       interpret=True),
        make_allocator=lambda n, ps: TokenSlotAllocator(n, ps, CPU),
        make_graph_runner=lambda model, bs: DecodeGraphRunner(model, bs, CPU, JitBucketCapture(),
                                                              batch_sizes=(1, 2, 4)))


class TestPallasKernelsInterpreted(BackendConformance):
    grid = "quick"
    dtypes = (torch.float32,)  # fp16 and bf16: the cases below (each new shape compiles anew)
    graph_max_batch_size = 4
    graph_steps = 2
    graph_page_sizes = (16,)  # the runner is layout-blind; test_graph_runner.py does both

    def kit_backend(self):
        return pallas_on_cpu()


def test_half_precision_pools():
    kb = pallas_on_cpu()
    kit.check_extend(kb, AttentionCase((33, 0, 3), (1, 20, 9), 6, 2, 64, 16, seed=2),
                     torch.float16)
    kit.check_decode(kb, AttentionCase((0, 39, 76), (1, 1, 1), 6, 2, 64, 16, seed=1),
                     torch.bfloat16)


def test_long_prefix_spans_many_pages():
    kit.check_extend(pallas_on_cpu(), AttentionCase((300,), (37,), 8, 1, 64, 16, seed=3),
                     torch.float32)
