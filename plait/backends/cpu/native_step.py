"""The CPU backend's native model step: ``csrc/src/layer_step.cpp`` runs every layer, the final
norm and the LM head of a batch in one call, installed as the model's ``decode_forward`` (a
decode batch) and ``extend_forward`` (a prefill batch).

Why: an eager decode step is ~40 tensor ops per layer, each a Python call and a dispatch; at
batch 1 that overhead, not the weights, is most of the step (see docs/benchmarks.md). The C++
step calls the same matrix-product kernels the eager path does (panel-packed or oneDNN-packed
float32, MKL ``at::linear``, or the quantized kernels of ``csrc/src/qmatmul.cpp``) and replaces
the glue between them with loops over the rows. Prefill (extend) runs through the same layers
(:class:`NativeExtend`): RMSNorm, RoPE and SiLU * up are single passes, parallel over rows, and
the MLP goes 1,024 rows at a time so its activations stay in cache (docs/cpu-backend.md has
the measured prefill); attention is called back into Python.

What holds:
- It is built only for a model it computes exactly (:func:`build_native_decode` returns None
  otherwise, and decode stays eager): Plait's ``LlamaForCausalLM`` in float32 or bfloat16 at
  tensor parallelism 1, KV in the model's dtype, every Linear plain, packed (panels or oneDNN;
  a bfloat16 model's: panels, as their 16-bit form) or quantized with a
  :class:`~plait.backends.cpu.qmatmul.CpuQuantizedMatmul` of this CPU's best level, and the
  paged C++ decode attention, and one sliding window (or none) for every layer: the step
  passes one slot table to all layers, the window's (``PagedDecodeAttentionBackend``).
- Its results differ from the eager step by float rounding only (sum order, ``exp``); the
  parity tests hold it to transformers' greedy tokens like the eager path.
- bfloat16 (``--dtype bfloat16``): the weights stay 16-bit (norms and RoPE tables are widened
  once, at build), the activations and every sum are float32 inside the step (the embedding
  widened on entry, float32 logits out), and the KV pool is bfloat16: the step rounds each new
  K/V row to it and attention widens it back, so attention reads half the bytes. This is
  transformers' bf16 model computed with float32 activations, not bit for bit its bf16
  arithmetic: tests/backends/test_cpu_bf16_step.py holds it to a stated greedy agreement.
- The C++ module keeps references to the weights and the KV buffers; they are never copied.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import torch
from torch import nn

from plait.backends.cpu import cpp_build
from plait.backends.cpu.linear import PackedLinear, computes_plain_linear
from plait.backends.cpu.native_lora import NativeLora
from plait.backends.cpu.paged_decode import PagedDecodeAttentionBackend
from plait.backends.cpu.qmatmul import CpuQuantizedMatmul
from plait.backends.cpu.greedy_head import GreedyHead
from plait.core.forward_batch import ForwardBatch, GreedyTokens
from plait.quant.modules import QuantizedLinear

log = logging.getLogger(__name__)


def extension() -> ModuleType:
    """The layer step's kernels, at :func:`cpp_build.best_level` (the level its quantized
    Linears must have been built for)."""
    return cpp_build.extension().layer_step


def native_linear(ext: ModuleType, module: nn.Module) -> Any | None:
    """``module``'s product as the C++ step's ``Linear``, or None where it cannot call it."""
    if isinstance(module, PackedLinear):
        if module.packed_weight.dtype != torch.float32:
            return None
        if module.layout == "panel":
            return ext.Linear.panel(
                module.packed_weight, module.out_features, module.bias, module.compact_form()
            )
        return ext.Linear.packed(module.packed_weight, module.bias)
    if isinstance(module, QuantizedLinear):
        matmul = module.matmul
        if not (isinstance(matmul, CpuQuantizedMatmul) and matmul.level == cpp_build.best_level()):
            return None
        w = module.qweight
        bias = None if module.bias is None else module.bias.detach().float().contiguous()
        return ext.Linear.quantized(
            w.qs, w.scales, w.mins, w.bits, w.group_size, matmul.int8_activations, bias
        )
    if computes_plain_linear(module) and module.weight.dtype == torch.float32:
        bias = None if module.bias is None else module.bias.detach()
        return ext.Linear.dense(module.weight.detach(), bias)
    return None


#: the model dtypes the step serves: float32, and bfloat16 with float32 activations
STEP_DTYPES = (torch.float32, torch.bfloat16)


def _on_cpu_as(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.dtype == dtype and t.device.type == "cpu"


def build_native_decode(
    model: nn.Module, attn: Any, greedy_head: bool = True
) -> "NativeDecode | None":
    """A :class:`NativeDecode` for ``model``, or None (with the reason logged) where the model
    is not one it computes exactly (see the module docstring)."""
    from plait.models.llama import LlamaForCausalLM

    def refuse(why: str) -> None:
        log.info("native decode step not used: %s; decode runs eagerly", why)
        return None

    if type(model) is not LlamaForCausalLM:
        return refuse(f"model class {type(model).__name__}")
    if model.tp.size != 1:
        return refuse("tensor parallelism")
    if model.pp_stage is not None:
        return refuse("a pipeline-parallel stage")
    if not isinstance(attn, PagedDecodeAttentionBackend):
        return refuse("the paged decode-attention kernel is not in use")
    dtype = attn.kv_pool.dtype
    if dtype not in STEP_DTYPES:
        return refuse(f"KV dtype {dtype}")
    if len(set(attn.sliding_windows)) > 1:  # one slot table serves every layer of the step
        return refuse("layers differ in their sliding window")
    if model.layers[0].self_attn.rotary.threshold is not None:  # the step reads fixed tables
        return refuse("RoPE frequencies depend on the sequence length (dynamic)")
    try:
        ext = extension()
    except Exception as e:  # a missing compiler surfaces as several error types
        return refuse(f"the CPU kernels could not be built ({e})")
    layers = list(model.layers)
    rotary = layers[0].self_attn.rotary
    norms = [model.norm] + [
        n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    if not all(_on_cpu_as(n.weight, dtype) for n in norms) or rotary.cos.device.type != "cpu":
        return refuse(f"weights are not {dtype} on the CPU (as the KV pool is)")
    eps = {n.eps for n in norms}
    if len(eps) != 1:
        return refuse("RMSNorm epsilons differ between layers")
    lm_head = native_linear(ext, model.lm_head)
    if lm_head is None:
        return refuse(f"lm_head {type(model.lm_head).__name__}")
    first = layers[0].self_attn
    step = ext.DecodeModel(
        first.num_heads,
        first.num_kv_heads,
        first.head_dim,
        eps.pop(),
        attn.scale,
        rotary.cos.float(),  # a bf16 model's tables as its eager step rounds them
        rotary.sin.float(),
        model.norm.weight.detach().float(),  # the step's own copies where widened
        lm_head,
    )
    pool = attn.kv_pool
    for i, layer in enumerate(layers):
        sa, mlp = layer.self_attn, layer.mlp
        linears = [
            native_linear(ext, m) for m in (sa.qkv_proj, sa.o_proj, mlp.gate_up_proj, mlp.down_proj)
        ]
        if any(lin is None for lin in linears):
            return refuse(f"layer {i} has a Linear the C++ step cannot call")
        if sa.layer_id != i:
            return refuse("layer ids are not in order")
        qkv, o, gate_up, down = linears
        step.add_layer(
            layer.input_layernorm.weight.detach().float(),
            qkv,
            o,
            layer.post_attention_layernorm.weight.detach().float(),
            gate_up,
            down,
            pool.k_buffers[i],
            pool.v_buffers[i],
        )
    greedy = GreedyHead.for_head(model.lm_head) if greedy_head else None
    return NativeDecode(model, step, greedy)


class NativeDecode:
    """``model.decode_forward``: ``(batch, attn) -> logits [B, V]`` (float32) after
    ``attn.init_forward_metadata(batch)`` (which built the paged attention's slot table); for a
    ``greedy_only`` batch, :class:`GreedyTokens` from ``greedy`` where there is one."""

    def __init__(self, model: nn.Module, step: Any, greedy: "GreedyHead | None" = None):
        self._embed = model.embed_tokens
        self.step = step
        self.greedy = greedy
        self.lora = NativeLora(step)

    @property
    def carries_lora(self) -> bool:
        """Whether batches with LoRA adapters may run here (see :meth:`attach_lora`)."""
        return self.lora.attached

    def attach_lora(self, ctx: Any) -> bool:
        """Serve ``ctx``'s adapters (``plait.lora``) in this step and its extend; False where
        it cannot (the model then runs adapter batches eagerly)."""
        return self.lora.attach(ctx)

    def __call__(
        self, batch: ForwardBatch, attn: PagedDecodeAttentionBackend
    ) -> "torch.Tensor | GreedyTokens":
        slots, lens = attn.decode_metadata()
        if len(batch.logits_rows) != batch.batch_size:
            raise ValueError("the native decode step returns logits for every row")
        x = self._embed(batch.input_ids).float()  # bf16 embeddings widened: float32 inside
        with self.lora.applied():
            if batch.greedy_only and self.greedy is not None:
                return self.greedy(
                    self.step.hidden(x, batch.positions, batch.out_cache_loc, slots, lens)
                )
            return self.step.forward(x, batch.positions, batch.out_cache_loc, slots, lens)


class NativeExtend:
    """``model.extend_forward``: ``(batch, attn) -> logits [len(logits_rows), V]`` for a
    prefill batch, after ``attn.init_forward_metadata(batch)``. The same C++ layers as
    :class:`NativeDecode`; attention is ``attn.forward_extend``, called back from C++ once a
    layer (the cascade over shared prefixes stays in Python, where SDPA's flash kernel is)."""

    def __init__(self, model: nn.Module, step: Any, lora: NativeLora):
        self._embed = model.embed_tokens
        self.step = step
        self.lora = lora

    @property
    def carries_lora(self) -> bool:
        return self.lora.attached

    def __call__(self, batch: ForwardBatch, attn: PagedDecodeAttentionBackend) -> torch.Tensor:
        x = self._embed(batch.input_ids).float()

        def attend(q: torch.Tensor, layer_id: int) -> torch.Tensor:
            return attn.forward_extend(q, layer_id, batch)

        with self.lora.applied():
            return self.step.extend(
                x, batch.positions, batch.out_cache_loc, batch.logits_rows.long(), attend
            )


def install_native_decode(model: nn.Module, attn: Any, greedy_head: bool = True) -> bool:
    """Make ``model`` decode through :class:`NativeDecode` and prefill through
    :class:`NativeExtend` where :func:`build_native_decode` can build it; True when
    installed. ``greedy_head``: greedy-only decode batches take their tokens from
    :class:`~plait.backends.cpu.greedy_head.GreedyHead` where it can serve the LM head."""
    native = build_native_decode(model, attn, greedy_head)
    if native is None:
        return False
    model.decode_forward = native
    model.extend_forward = NativeExtend(model, native.step, native.lora)
    return True
