"""The CPU backend's decode capture: ``torch.compile`` (Inductor's C++ codegen) of the decode
step, behind the device-neutral padding of :class:`~plait.core.graph_runner.DecodeGraphRunner`.

What is compiled is :meth:`LlamaForCausalLM.layers_forward` (embedding, layers, lm_head): the
attention metadata built from host lists (``init_forward_metadata``) runs eagerly first, so
the compiled code reads tensors only and never guards on a request's length. It is compiled
with dynamic shapes: the batch and KV-length dimensions are symbolic, so a step with a longer
KV does not recompile, and Dynamo's 0/1 specialisation leaves two graphs in steady state
(batch 1, and every padded batch size above it; the CPU attention masks exactly when the
batch has more than one row, so the mask never adds a variant). The engine's warm-up
compiles both. Every graph Dynamo builds is counted in
:attr:`CompileCapture.compiles` (exported as ``graph_compiles`` by ``get_server_info``).

The Linear layers stay packed (panels or oneDNN): inside the graph they are the ``plait::packed_linear``
custom op (``plait.backends.cpu.linear``), and Inductor fuses the RMSNorm, RoPE, SiLU·mul and
residual elementwise work around them.

Why it is off by default: compiling the 30-layer SmolLM2-135M took minutes on the 2-core
development machine (413 s while three other jobs shared it), far too long for ``make run``
and the test suite. Opt in with ``enable_graph_capture=True`` / ``--enable-graph-capture``;
the compiled artifacts land in Inductor's on-disk cache, which makes later starts faster.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class CompileCapture:
    """A :class:`~plait.core.graph_runner.GraphCapture` for the CPU: it installs the compiled
    body as ``model.decode_forward`` once; ``capture`` runs the step once (that first run at
    a new padded size is where Dynamo compiles or reuses a graph) and replays by rerunning it.
    """

    def __init__(self, model: Any):
        self.compiles = 0
        model.decode_forward = torch.compile(
            model.layers_forward, dynamic=True, fullgraph=True, backend=self._counting_inductor
        )

    def _counting_inductor(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.compiles += 1
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    def stats(self) -> dict[str, int]:
        return {"graph_compiles": self.compiles}

    def capture(self, step: Callable[[], Any]) -> Callable[[], Any]:
        step()
        return step
