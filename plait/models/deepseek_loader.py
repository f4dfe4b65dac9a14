"""Loading a DeepSeek-V2/V3 checkpoint into :class:`~plait.models.deepseek.DeepseekForCausalLM`
and declaring its latent KV layout.

Checkpoint names map onto Plait's parameters with three reshapes: ``kv_b_proj`` splits per
head into ``w_uk``/``w_uv`` (the absorbed form's two matrices), ``gate_proj``/``up_proj`` fuse
into ``gate_up_proj``, and per-expert weights (``experts.{e}.gate_proj``..., DeepSeek's and
transformers' saved form) stack into ``w_gate_up`` [E, 2I, H] / ``w_down`` [E, H, I]; the
stacked form (``experts.gate_up_proj``) loads as is. Multi-token-prediction layers (indices
past ``num_hidden_layers``) are not part of the causal LM and are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from plait.core.kv_layout import KVCacheLayout, latent_layout
from plait.models.checkpoint_files import checkpoint_entries
from plait.models.deepseek import ARCHITECTURES, DeepseekForCausalLM
from plait.models.deepseek_moe import DeepseekMoE
from plait.models.llama import RotaryEmbedding

if TYPE_CHECKING:
    from plait.core.backend_api import ModelSpec
    from plait.quant.modules import QuantizedMatmul

_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSE = {"gate_proj": 0, "up_proj": 1}

#: how a checkpoint tensor lands in a Plait tensor: ``copy(target_tensor, checkpoint_tensor)``
Copy = Callable[[torch.Tensor, torch.Tensor], None]


class DeepseekLoader:
    """The registered loader (``plait.models.ModelLoader``) of one DeepSeek version, with the
    ``kv_layout`` declaration the engine sizes and builds the pool from."""

    def __init__(self, version: int):
        self.version = version

    def __repr__(self) -> str:
        return f"DeepseekLoader(version={self.version})"

    def kv_layout(self, hf_config: Any, tp_size: int, tp_rank: int) -> KVCacheLayout:
        if tp_size != 1:
            raise ValueError(
                f"tp_size={tp_size} is not supported for {hf_config.architectures[0]}: its "
                "multi-head latent attention (MLA) cache holds one latent shared by all heads, "
                "which is not sharded across ranks yet"
            )
        return latent_layout(
            num_layers=hf_config.num_hidden_layers,
            kv_lora_rank=hf_config.kv_lora_rank,
            rope_dim=hf_config.qk_rope_head_dim,
        )

    def __call__(
        self, spec: ModelSpec, device: torch.device, matmul: QuantizedMatmul | None
    ) -> torch.nn.Module:
        if spec.quantization.method != "none":
            raise ValueError(
                f"quantization={spec.quantization.method!r} is not supported for "
                f"{spec.hf_config.architectures[0]} (MLA) models yet"
            )
        self.kv_layout(spec.hf_config, spec.tp.size, spec.tp.rank)  # refuses tp > 1
        model = load_deepseek(
            spec.model_dir, spec.hf_config, self.version, spec.dtype, device, spec.context_len
        )
        fused = getattr(spec, "fused_moe", None)  # the backend's grouped-experts op, if any
        if fused is not None:
            for moe in model.modules():
                if isinstance(moe, DeepseekMoE):
                    moe.fused = fused
        return model


def loaders() -> dict[str, DeepseekLoader]:
    return {name: DeepseekLoader(version) for name, version in ARCHITECTURES.items()}


def load_deepseek(
    model_dir: Path,
    config: Any,
    version: int,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
) -> DeepseekForCausalLM:
    """The model with its weights, built on the meta device first; router weights stay
    float32 whatever ``dtype`` (transformers keeps them so)."""
    with torch.device("meta"):
        model = DeepseekForCausalLM(config, max_positions, version)
    model = model.to_empty(device=device).float()
    model.rotary = RotaryEmbedding(config, config.qk_rope_head_dim, max_positions).to(device)
    _load_weights(model, model_dir, config)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.embed_tokens.weight
    routers = [
        (m, m.gate_weight.data.clone(), m.e_score_correction_bias.data.clone())
        for m in model.modules()
        if isinstance(m, DeepseekMoE)
    ]
    model = model.to(dtype).eval()
    for moe, gate, bias in routers:
        moe.gate_weight.data, moe.e_score_correction_bias.data = gate, bias
    return model


def _load_weights(model: DeepseekForCausalLM, model_dir: Path, config: Any) -> None:
    targets = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, f in checkpoint_entries(model_dir):
        mapped = _map_name(name, model)
        if mapped is None:
            continue
        target, copy = mapped
        if target not in targets:
            raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
        with torch.no_grad():
            copy(targets[target], f.get_tensor(name).float())
        loaded.add(target)
        if target.endswith(".w_uk"):  # kv_b_proj fills both halves
            loaded.add(target.removesuffix("w_uk") + "w_uv")
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    optional = {n for n in targets if n.endswith("e_score_correction_bias")}
    missing = set(targets) - loaded - tied - optional
    if missing:
        raise ValueError(f"checkpoint in {str(model_dir)!r} lacks weights: {sorted(missing)[:5]}")


def _whole(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src.view(dst.shape))


def _rows(piece: int, size: int) -> Copy:
    return lambda dst, src: dst[piece * size : (piece + 1) * size].copy_(src)


def _map_name(name: str, model: DeepseekForCausalLM) -> tuple[str, Copy] | None:
    """(Plait tensor name, how to copy into it) for a checkpoint tensor; None to skip."""
    name = name.removeprefix("model.")
    if "rotary_emb" in name:
        return None
    if not name.startswith("layers."):
        return name, _whole
    index = int(name.split(".")[1])
    if index >= len(model.layers):  # a multi-token-prediction layer
        return None
    layer = model.layers[index]
    prefix = f"layers.{index}."
    attn = layer.self_attn
    if name.endswith("self_attn.kv_b_proj.weight"):
        return prefix + "self_attn.w_uk", _split_kv_b(attn)
    expert = _EXPERT.search(name)
    if expert:
        e, proj = int(expert.group(1)), expert.group(2)
        inter = layer.mlp.w_down.shape[-1]
        if proj == "down_proj":
            return prefix + "mlp.w_down", lambda dst, src: dst[e].copy_(src)
        piece = _FUSE[proj]
        return prefix + "mlp.w_gate_up", lambda dst, src: dst[e][
            piece * inter : (piece + 1) * inter
        ].copy_(src)
    if name.endswith("mlp.experts.gate_up_proj"):
        return prefix + "mlp.w_gate_up", _whole
    if name.endswith("mlp.experts.down_proj"):
        return prefix + "mlp.w_down", _whole
    if name.endswith("mlp.gate.weight"):
        return prefix + "mlp.gate_weight", _whole
    if name.endswith("mlp.gate.e_score_correction_bias"):
        return prefix + "mlp.e_score_correction_bias", _whole
    for proj, piece in _FUSE.items():
        if f".{proj}.weight" in name:
            owner = layer.mlp if ".shared_experts." not in name else layer.mlp.shared_experts
            fused = name.replace(proj, "gate_up_proj")
            return fused, _rows(piece, owner.inter)
    return name, _whole


def _split_kv_b(attn: Any) -> Copy:
    """``kv_b_proj.weight`` [H * (nope + v), R] -> ``w_uk`` [H, nope, R] and ``w_uv``
    [H, v, R]. The copy is given ``w_uk`` and fills ``w_uv`` beside it."""

    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        per_head = src.view(attn.num_heads, attn.nope_dim + attn.v_dim, attn.kv_lora_rank)
        dst.copy_(per_head[:, : attn.nope_dim])
        attn.w_uv.data.copy_(per_head[:, attn.nope_dim :])

    return copy
