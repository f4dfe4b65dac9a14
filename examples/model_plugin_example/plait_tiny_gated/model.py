"""``TinyGatedLlamaForCausalLM``: Llama whose attention and MLP branches are scaled by
``config.residual_scale`` before they join the residual stream
(``x + s * attn(norm(x))``, then ``x + s * mlp(norm(x))``).

Everything else is Plait's Llama, reused as it is: the layers, the parameter names (so
Plait's safetensors loader reads the checkpoint), tensor-parallel sharding and the paged
attention contract.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from plait.core.forward_batch import ForwardBatch
from plait.core.tp.group import TPGroup
from plait.models.llama import DecoderLayer, LlamaForCausalLM

ARCHITECTURE = "TinyGatedLlamaForCausalLM"


class GatedDecoderLayer(DecoderLayer):
    def __init__(self, config: Any, layer_id: int, rotary: Any, tp: TPGroup):
        super().__init__(config, layer_id, rotary, tp)
        self.residual_scale = float(config.residual_scale)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        attn: Any,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        s = self.residual_scale
        x = x + s * self.self_attn(self.input_layernorm(x), batch, attn, rope)
        return x + s * self.mlp(self.post_attention_layernorm(x))


class TinyGatedLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any, max_positions: int, tp: TPGroup = TPGroup()):
        if not hasattr(config, "residual_scale"):
            raise ValueError(f"{ARCHITECTURE} needs `residual_scale` in config.json")
        super().__init__(config, max_positions, tp)
        rotary = self.layers[0].self_attn.rotary
        self.layers = nn.ModuleList(
            GatedDecoderLayer(config, i, rotary, tp) for i in range(config.num_hidden_layers)
        )
