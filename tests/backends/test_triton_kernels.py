"""The CUDA/ROCm Triton kernels pass the conformance kit on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py), in fp32 and fp16, on the quick grid."""

import os

import pytest
import torch

import plait

pytest.importorskip("triton")

from plait.backends.cuda.launch import INTERPRETER, LaunchParams  # noqa: E402
from plait.backends.cuda.triton_backend import TritonBackend  # noqa: E402
from plait.backends.rocm.launch import ROCM_DEFAULT  # noqa: E402
from plait.core.graph_runner import DecodeGraphRunner, EagerCapture  # noqa: E402
from plait.testing import BackendConformance, kit  # noqa: E402
from plait.testing.cases import AttentionCase  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 (CPU-only machine); on a GPU the kernels are certified "
    "by the hardware conformance class in test_registered_backends.py",
)

CPU = torch.device("cpu")


class TritonInterpreted(TritonBackend):
    """The CUDA/ROCm backend's kernels on CPU tensors: only the device and the capture differ
    (and the tiles, kept small for the interpreter). Registered by the greedy-parity test."""

    name = "triton-interpret"
    priority = -100
    launch = INTERPRETER
    torch_device = CPU

    def create_graph_runner(self, model, max_batch_size):
        return DecodeGraphRunner(model, max_batch_size, CPU, EagerCapture(), batch_sizes=(1, 2, 4))


class RocmTilesInterpreted(TritonInterpreted):
    name = "rocm-interpret"
    launch = ROCM_DEFAULT


class TestTritonKernelsInterpreted(BackendConformance):
    grid = "quick"
    graph_max_batch_size = 4  # the interpreter runs each program in numpy: keep grids small
    graph_steps = 1
    graph_page_sizes = (16,)  # the runner is layout-blind; test_graph_runner.py does both

    def make_backend(self):
        return TritonInterpreted()


def test_kernels_really_run_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    from plait.backends.cuda import decode_attention, extend_attention, quantized_matmul

    for kernel in (
        extend_attention._extend_kernel,
        decode_attention._decode_stage1,
        decode_attention._decode_stage2,
        quantized_matmul._qmatmul_kernel,
    ):
        assert isinstance(kernel, InterpretedFunction), (
            "a kernel module was imported before TRITON_INTERPRET=1 was set"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_rocm_launch_params_give_the_same_results(dtype):
    # AMD tiles (64x64), 16 KV splits and waves_per_eu reach the same numbers.
    kb = RocmTilesInterpreted()
    kit.check_extend(kb, AttentionCase((70, 0), (9, 66), 6, 2, 64, 16, seed=5), dtype)
    kit.check_decode(kb, AttentionCase((70, 3), (1, 1), 6, 2, 64, 16, seed=6), dtype)


def test_bfloat16_attention_meets_its_tolerance():
    # the interpreter widens bf16 to fp32 (see dot_inputs.compute_dtype); a GPU takes bf16 dot inputs,
    # which TestCudaDevice checks
    kb = TritonInterpreted()
    kit.check_extend(kb, AttentionCase((21,), (19,), 6, 2, 64, 1, seed=7), torch.bfloat16)
    kit.check_decode(kb, AttentionCase((21, 5), (1, 1), 6, 2, 64, 1, seed=8), torch.bfloat16)


def test_more_splits_than_keys_leaves_empty_splits_weightless():
    class ManySplits(TritonInterpreted):
        launch = LaunchParams(
            extend_block_m=16,
            extend_block_n=16,
            decode_block_n=16,
            num_kv_splits=8,
            num_warps=1,
            num_stages=1,
        )

    kit.check_decode(ManySplits(), AttentionCase((0, 2), (1, 1), 4, 4, 64, 1), torch.float32)


@pytest.mark.slow  # a minute under the interpreter; test_sliding_window_matches_reference is quick
def test_sliding_window_greedy_matches_transformers(make_tiny_model):
    """The kernels in the engine on a Mistral whose window is far shorter than its prompts
    and generations: transformers' tokens, batched, chunked and after prefix-cache hits."""
    from plait.testing.register import temporarily_registered
    from tests.models.test_sliding_window import (
        PROMPTS,
        expected_past_the_window,
        generate_twice,
        windowed_mistral,
    )

    path = windowed_mistral(make_tiny_model)
    prompts = PROMPTS[:2]  # the interpreter runs every program in numpy: keep it short
    want = expected_past_the_window(path, prompts)
    with temporarily_registered(TritonInterpreted) as name:
        with plait.Engine(
            path, device=name, dtype="float32", max_total_tokens=2048, chunked_prefill_size=16
        ) as engine:
            assert engine.scheduler.runner.attn.sliding_windows == (8, 8)
            assert generate_twice(engine, prompts) == want
