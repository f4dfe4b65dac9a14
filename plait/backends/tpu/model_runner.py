"""The TPU backend's model runner: the whole forward in JAX, one jitted program per bucket.

The scheduler drives it exactly like :class:`plait.core.model_runner.ModelRunner`:
``prepare_extend(items)`` / ``prepare_decode(reqs, slots, input_ids)`` on the scheduler thread
return a :class:`JaxStep`, and ``run(step)`` (on the overlap worker) returns torch logits; a
decode step's token ids may be future-token placeholders until the executor resolves
``step.input_ids`` just before ``run``. It owns nothing the core owns. Per step:

1. write the new tokens' slots into ``req_to_token`` (host, as the torch runner does);
2. build the padded int32 inputs for the step's bucket (:mod:`.step_inputs`) and move them to
   the device in one transfer;
3. run the bucket's compiled program (:mod:`.graph`): params and caches stay on the device,
   the caches are donated and the updated ones replace them in the :class:`JaxKVPool`;
4. bring the logits back in one transfer, as a float32 torch tensor for the core's sampler.

No torch module runs: torch appears only as the scheduler's slot tensors and the returned
logits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
import torch

from plait.backends.tpu import jax_attention, jax_llama, step_inputs
from plait.backends.tpu.attention import JaxKVPool
from plait.backends.tpu.graph import CompiledSteps, JitBuckets
from plait.core.memory import ReqToTokenPool
from plait.core.forward_batch import ExtendItem
from plait.core.request import Req


def attention_functions(impl: str, page_size: int, platform: str) -> tuple[Callable, Callable]:
    """(decode, extend) attention for the jitted step; ``impl`` is ``jax`` or ``pallas``
    (interpreted unless ``platform``, the device the step runs on, is a TPU)."""
    if impl == "jax":
        decode, extend = jax_attention.jax_decode, jax_attention.jax_extend
    elif impl == "pallas":
        interpret = platform != "tpu"
        decode = functools.partial(jax_attention.pallas_decode, interpret=interpret)
        extend = functools.partial(jax_attention.pallas_extend, interpret=interpret)
    else:
        raise ValueError(f"attention must be 'jax' or 'pallas', got {impl!r}")
    return (
        functools.partial(decode, page_size=page_size),
        functools.partial(extend, page_size=page_size),
    )


@dataclass
class JaxStep:
    """One prepared step: the bucket's program key, its padded host inputs, and the real rows'
    token ids as a torch tensor (the executor resolves overlap placeholders in it)."""

    key: tuple
    inputs: dict[str, np.ndarray]
    input_ids: torch.Tensor
    num_rows: int
    is_decode: bool


class JaxModelRunner:
    """Invariants: ``kv_pool.k_buffers``/``v_buffers`` always hold the live caches (the
    donated ones are dead after a step); every program comes from ``self.steps``, so
    ``self.steps.compiles`` is the number of XLA compilations of model steps."""

    def __init__(
        self,
        params: dict,
        shape: jax_llama.LlamaShape,
        kv_pool: JaxKVPool,
        req_pool: ReqToTokenPool,
        buckets: JitBuckets,
        attention: str,
    ):
        if buckets.min_kv_width % kv_pool.page_size:
            raise ValueError(
                f"page_size={kv_pool.page_size} must divide the smallest kv "
                f"width bucket {buckets.min_kv_width}"
            )
        self.params, self.shape = params, shape
        self.kv_pool, self.req_pool, self.buckets = kv_pool, req_pool, buckets
        self.attention = attention
        self.jax_device = kv_pool.jax_device
        # The step's token ids stay in a host tensor (``step.input_ids``), so the executor's
        # placeholders resolve on the CPU.
        self.device = torch.device("cpu")
        decode, extend = attention_functions(attention, kv_pool.page_size, self.jax_device.platform)
        self._forward = {
            "decode": jax_llama.make_forward(shape, decode),
            "extend": jax_llama.make_forward(shape, extend),
        }
        self.steps = CompiledSteps(self._make_program)

    # ----- the scheduler's contract -----

    def prepare_extend(self, items: list[ExtendItem]) -> tuple[JaxStep, list[int]]:
        """Prefill (chunks of) prompts: the step, and per item how many of its logits rows
        are that item's."""
        r2t = self.req_pool.req_to_token
        ids, slots, rows, counts = [], [], [], []
        for it in items:
            r2t[it.req.req_pool_idx, it.start : it.start + it.length] = it.slots.to(r2t.dtype)
            base = len(ids)
            ids.extend(it.token_ids)
            slots.extend(it.slots.tolist())
            first = max(it.logit_from, it.start) - it.start
            rows.extend(range(base + first, base + it.length))
            counts.append(it.length - first)
        b = self.buckets
        tokens, batch = b.tokens(len(ids)), b.batch(len(items))
        width = b.kv_width(max(it.start + it.length for it in items))
        num_rows = batch if len(rows) <= batch else tokens
        inputs = step_inputs.extend_inputs(
            r2t.numpy(),
            [it.req.req_pool_idx for it in items],
            [it.start for it in items],
            [it.length for it in items],
            ids,
            slots,
            rows,
            tokens,
            batch,
            width,
            num_rows,
        )
        return JaxStep(
            ("extend", tokens, batch, width, num_rows),
            inputs,
            torch.tensor(ids, dtype=torch.int64),
            len(rows),
            False,
        ), counts

    def prepare_decode(self, reqs: list[Req], slots: torch.Tensor, input_ids: list[int]) -> JaxStep:
        """One new token per request at position ``kv_len``; ``input_ids[i]`` is a token or a
        placeholder the executor resolves."""
        r2t = self.req_pool.req_to_token
        rows, pos = [r.req_pool_idx for r in reqs], [r.kv_len for r in reqs]
        r2t[rows, pos] = slots.to(r2t.dtype)
        batch, width = self.buckets.batch(len(reqs)), self.buckets.kv_width(max(pos) + 1)
        inputs = step_inputs.decode_inputs(
            r2t.numpy(), rows, pos, [0] * len(reqs), slots.tolist(), batch, width
        )
        return JaxStep(
            ("decode", batch, width),
            inputs,
            torch.tensor(input_ids, dtype=torch.int64),
            len(reqs),
            True,
        )

    def run(self, step: JaxStep) -> torch.Tensor:
        """The step's logits for its real rows; token ids are read from ``step.input_ids``
        here, after any placeholder was resolved."""
        ids = step.inputs["input_ids"].copy()
        ids[: len(step.input_ids)] = step.input_ids.numpy()
        return self._run(step.key, {**step.inputs, "input_ids": ids})[: step.num_rows]

    def metrics(self) -> dict[str, Any]:
        """Exported through ``Engine.get_server_info``."""
        return {
            "jit_compiles": self.steps.compiles,
            "jit_programs_max": self.buckets.max_programs(),
            "tpu_attention": self.attention,
        }

    # ----- the device side -----

    def _run(self, key: tuple, inputs: dict[str, np.ndarray]) -> torch.Tensor:
        program = self.steps.get(key)
        pool = self.kv_pool
        logits, pool.k_buffers, pool.v_buffers = program(
            self.params, pool.k_buffers, pool.v_buffers, jax.device_put(inputs, self.jax_device)
        )
        return torch.from_numpy(np.array(logits))  # the one device-to-host copy of the step

    def _make_program(self, key: tuple) -> tuple[Any, tuple]:
        kind = key[0]
        if kind == "decode":
            _, batch, width = key
            example = step_inputs.decode_inputs(
                np.zeros((1, 1), np.int32), [], [], [], [], batch, width
            )
        else:
            _, tokens, batch, width, num_rows = key
            example = step_inputs.extend_inputs(
                np.zeros((1, 1), np.int32), [], [], [], [], [], [], tokens, batch, width, num_rows
            )
        fn = jax.jit(self._forward[kind], donate_argnums=(1, 2))
        pool = self.kv_pool
        return fn, (
            self.params,
            pool.k_buffers,
            pool.v_buffers,
            jax.device_put(example, self.jax_device),
        )
