"""The shared MoE pieces against transformers' own modules on the same weights: routing
(softmax, top-k, ``norm_topk_prob``) equals Mixtral's and Qwen2-MoE's routers, the grouped
experts op equals ``MixtralExperts`` in float32, and the op never loops over tokens."""

from __future__ import annotations

import pytest
import torch

from plait.models.moe import SparseMoeBlock, softmax_topk
from plait.ops import fused_moe
from plait.ops.fused_moe import fused_experts

E, H, INTER, K = 6, 64, 32, 2


def random_case(t: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, H, generator=g).to(dtype)
    w_gate_up = (torch.randn(E, 2 * INTER, H, generator=g) * 0.15).to(dtype)
    w_down = (torch.randn(E, H, INTER, generator=g) * 0.15).to(dtype)
    logits = torch.randn(t, E, generator=g)
    weights, ids = softmax_topk(logits, K, renormalize=True)
    return hidden, w_gate_up, w_down, weights, ids


def loop_reference(hidden, w_gate_up, w_down, weights, ids, act=torch.nn.functional.silu):
    """Token by token, expert by expert: the definition, written as plainly as possible."""
    out = torch.zeros_like(hidden, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w_gate_up[e].double() @ hidden[t].double()
            y = w_down[e].double() @ (act(h[:INTER]) * h[INTER:])
            out[t] += float(weights[t, j]) * y
    return out


def hf_config(model_type: str, **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        model_type,
        hidden_size=H,
        intermediate_size=INTER,
        moe_intermediate_size=INTER,
        num_experts_per_tok=K,
        hidden_act="silu",
        **kw,
    )


def test_routing_matches_mixtral_and_qwen2_moe_routers():
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    x = torch.randn(9, H, generator=torch.Generator().manual_seed(1))
    for router, renorm in (
        (MixtralTopKRouter(hf_config("mixtral", num_local_experts=E)), True),
        (Qwen2MoeTopKRouter(hf_config("qwen2_moe", num_experts=E, norm_topk_prob=False)), False),
        (Qwen2MoeTopKRouter(hf_config("qwen2_moe", num_experts=E, norm_topk_prob=True)), True),
    ):
        torch.nn.init.normal_(router.weight, std=0.5)
        logits, want_w, want_ids = router(x)
        weights, ids = softmax_topk(logits, K, renorm)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(weights, want_w, rtol=0, atol=1e-7)
        assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert not torch.allclose(softmax_topk(logits, K, True)[0], softmax_topk(logits, K, False)[0])


def test_fused_experts_matches_transformers_mixtral_experts():
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    hidden, w_gate_up, w_down, weights, ids = random_case(13)
    experts = MixtralExperts(hf_config("mixtral", num_local_experts=E))
    with torch.no_grad():
        experts.gate_up_proj.copy_(w_gate_up)
        experts.down_proj.copy_(w_down)
        want = experts(hidden, ids, weights)
    got = fused_experts(hidden, w_gate_up, w_down, weights, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    want64 = loop_reference(hidden, w_gate_up, w_down, weights, ids)
    torch.testing.assert_close(got.double(), want64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_pytorch_tanh"])
def test_fused_experts_activations_and_unused_experts(activation):
    hidden, w_gate_up, w_down, weights, ids = random_case(5, seed=3)
    ids = torch.where(ids == 2, torch.full_like(ids, 4), ids)  # expert 2 gets no token
    ids[:, 1] = torch.where(ids[:, 0] == ids[:, 1], (ids[:, 0] + 1) % E, ids[:, 1])
    act = fused_moe.activation_fn(activation)
    got = fused_experts(hidden, w_gate_up, w_down, weights, ids, activation)
    want = loop_reference(hidden, w_gate_up, w_down, weights, ids, act)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_fused_experts_refuses_bad_operands():
    hidden, w_gate_up, w_down, weights, ids = random_case(4)
    with pytest.raises(ValueError, match="activation 'relu2'"):
        fused_experts(hidden, w_gate_up, w_down, weights, ids, "relu2")
    with pytest.raises(ValueError, match=r"want \[E, 2I, H\]"):
        fused_experts(hidden, w_gate_up, w_down[:, :, :-1], weights, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_experts(hidden, w_gate_up, w_down, weights, ids[:3])
    with pytest.raises(ValueError, match="num_experts_per_tok=7"):
        SparseMoeBlock(
            hidden_size=H, num_experts=E, top_k=7, intermediate_size=INTER, renormalize=True
        )


def test_one_grouped_product_per_expert_whatever_the_batch(monkeypatch):
    """The op's expert calls depend on the experts that have tokens, never on the number of
    tokens: 1 token costs k products, 64 tokens at most E."""
    calls: list[int] = []
    real = fused_moe.grouped_experts

    def counting(hidden, topk_weights, topk_ids, num_experts, expert):
        def counted(e, x):
            calls.append(x.shape[0])
            return expert(e, x)

        return real(hidden, topk_weights, topk_ids, num_experts, counted)

    monkeypatch.setattr(fused_moe, "grouped_experts", counting)
    for t in (1, 64):
        calls.clear()
        hidden, w_gate_up, w_down, weights, ids = random_case(t, seed=t)
        fused_moe.fused_experts(hidden, w_gate_up, w_down, weights, ids)
        assert len(calls) == len(set(ids.flatten().tolist())) <= E
        assert sum(calls) == t * K


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_experts_agree_with_the_float_op(method):
    """Quantized experts compute the float op on their dequantized weights (to rounding),
    and stay within the format's error of the float weights."""
    from plait.models.moe import MoEExperts
    from plait.models.moe_quant import quantize_experts
    from plait.quant.formats import dequantize
    from plait.quant.modules import torch_quantized_matmul

    hidden, w_gate_up, w_down, weights, ids = random_case(17, seed=5)
    experts = MoEExperts(E, H, INTER)
    with torch.no_grad():
        experts.w_gate_up.copy_(w_gate_up)
        experts.w_down.copy_(w_down)
    q = quantize_experts(experts, method, torch_quantized_matmul, 32, False)
    assert q is not None and len(q.gate_up) == E
    deq_gu = torch.stack([dequantize(m.qweight, torch.float32) for m in q.gate_up])
    deq_d = torch.stack([dequantize(m.qweight, torch.float32) for m in q.down])
    got = q(hidden, weights, ids)
    torch.testing.assert_close(got, fused_experts(hidden, deq_gu, deq_d, weights, ids))
    want = fused_experts(hidden, w_gate_up, w_down, weights, ids)
    rel = (got - want).norm() / want.norm()
    assert rel < (0.02 if method == "int8" else 0.15)
    assert not torch.equal(deq_gu, w_gate_up)  # really quantized
