"""The conformance suite as a pytest class: subclass it, name a device, run pytest.

    # tests/test_my_backend.py
    from plait.testing import BackendConformance

    class TestMyDevice(BackendConformance):
        device = "mydevice"           # a name registered in the plait.backends entry points

Every test skips (with the registry's reason) where the device is unavailable. Override
:meth:`BackendConformance.make_backend` to certify a :class:`~plait.core.backend_api.Backend`
that is not registered (for example a subclass running Triton kernels on CPU tensors under
``TRITON_INTERPRET=1``): the greedy-parity test registers its class for the run. Such a class
should have a negative ``priority`` so ``--device auto`` never picks it.

The attention grid is ``quick`` unless ``grid`` is set on the class, ``--plait-kit-grid full``
is given (with ``-p plait.testing.plugin``) or ``PLAIT_KIT_GRID=full`` is in the environment.
"""

from __future__ import annotations

import os

import pytest
import torch

from plait.core.backend_api import Backend
from plait.testing import e2e, graph_kit, kit
from plait.testing.cases import AttentionCase, decode_cases, extend_cases, quant_cases
from plait.testing.register import temporarily_registered
from plait.testing.tiny_model import make_tiny_llama

GRID_ENV = "PLAIT_KIT_GRID"


def _grid(config: pytest.Config, cls: type) -> str:
    if getattr(cls, "grid", None):
        return cls.grid
    opt = config.getoption("plait_kit_grid", default=None)
    return opt or os.environ.get(GRID_ENV, "quick")


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class BackendConformance:
    """Kernels vs the CPU reference (attention, with and without a sliding window, quantized
    matmul), allocator invariants, graph replay, greedy parity."""

    device: str | None = None
    grid: str | None = None
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16)
    #: activation dtypes for the quantized matmul (``Backend.quantized_linear``)
    quant_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    page_sizes: tuple[int, ...] = (1, 16)
    #: extra ``plait.Engine`` keyword arguments for the greedy-parity run (None: skip it)
    engine_kwargs: dict | None = {}
    #: graph replay: the runner's max batch size, how many growing decode steps to replay,
    #: and the page sizes to replay with
    graph_max_batch_size: int = 8
    graph_steps: int = 3
    graph_page_sizes: tuple[int, ...] = (1, 16)

    #: (atol, rtol) per dtype for the attention checks (None: kit.TOLERANCES)
    tolerances: dict[torch.dtype, tuple[float, float]] | None = None

    def make_backend(self) -> Backend:
        """The backend object under test: by default the registered ``device``."""
        if self.device is None:
            pytest.skip("no device named: set `device` on the class or pass --plait-device")
        try:
            return kit.from_registry(self.device)
        except ValueError as e:
            pytest.skip(f"device {self.device!r} unavailable here: {e}")

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls) -> Backend:
        return cls().make_backend()

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        grid = _grid(metafunc.config, type(self))
        params = {
            "extend_case": (extend_cases(grid), lambda c: c.id),
            "decode_case": (decode_cases(grid), lambda c: c.id),
            "dtype": (list(self.dtypes), _dtype_id),
            "quant_case": (quant_cases(grid), lambda c: c.id),
            "quant_dtype": (list(self.quant_dtypes), _dtype_id),
            "page_size": (list(self.page_sizes), lambda p: f"page{p}"),
            "graph_page_size": (list(self.graph_page_sizes), lambda p: f"page{p}"),
        }
        for name, (values, ids) in params.items():
            if name in metafunc.fixturenames:
                metafunc.parametrize(name, values, ids=[ids(v) for v in values])

    def test_extend_matches_reference(self, backend, extend_case, dtype):
        kit.check_extend(backend, extend_case, dtype, self.tolerances)

    def test_decode_matches_reference(self, backend, decode_case, dtype):
        kit.check_decode(backend, decode_case, dtype, self.tolerances)

    def test_sliding_window_matches_reference(self, backend, page_size, dtype):
        """A window shorter than the cached prefix, than one chunk, and longer than a request;
        skipped where the backend refuses windows (the engine then refuses such models)."""
        extend = AttentionCase((45, 0, 20), (7, 37, 16), 6, 2, 64, page_size, seed=11)
        decode = AttentionCase((60, 3, 16), (1, 1, 1), 6, 2, 64, page_size, seed=12)
        try:
            kit.check_extend(backend, extend, dtype, self.tolerances, window=16)
            kit.check_decode(backend, decode, dtype, self.tolerances, window=16)
        except ValueError as e:
            if "is not supported by" not in str(e):
                raise
            pytest.skip(str(e))

    def test_quantized_linear_matches_dequantized(self, backend, quant_case, quant_dtype):
        kit.check_quantized_linear(backend, quant_case, quant_dtype)

    def test_allocator_invariants(self, backend, page_size):
        kit.check_allocator(backend, page_size)

    def test_graph_replay_matches_eager(self, backend, graph_page_size):
        if not graph_kit.check_graph_replay(
            backend,
            page_size=graph_page_size,
            max_batch_size=self.graph_max_batch_size,
            steps=self.graph_steps,
        ):
            pytest.skip(f"{backend.name} runs decode eagerly (no graph runner)")

    def test_greedy_parity_with_cpu(self, backend, tmp_path_factory):
        if self.engine_kwargs is None:
            pytest.skip("greedy parity disabled for this class (engine_kwargs = None)")
        if not e2e.engine_available():
            pytest.skip("plait.Engine is not available yet")
        model_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
        with temporarily_registered(type(backend)) as name:
            e2e.check_greedy_parity(name, model_dir, **self.engine_kwargs)
