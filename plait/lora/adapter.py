"""A LoRA adapter read from a PEFT directory (``adapter_config.json`` +
``adapter_model.safetensors``), checked against the base model it must serve.

What holds for a loaded :class:`LoraAdapter`: every module it targets is one of
:data:`TARGETS`; ``weights[(layer, module)]`` is ``(A [r, in], B [out, r])`` in float32 on the
host, with ``in``/``out`` the base model's shapes for that module; ``scaling`` is peft's
(``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``). Anything peft can express
that this serving path would not compute exactly (DoRA, trained biases, extra saved modules,
per-module rank or alpha patterns) is a ValueError naming the setting, never ignored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: the projections an adapter may target, in Plait's Llama layout (fused qkv and gate_up)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


@dataclass(kw_only=True)
class LoraConfig:
    """The settings of ``adapter_config.json`` Plait reads."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> "LoraConfig":
        """Parse peft's config; ValueError (naming ``where``) for what Plait cannot serve."""
        refused = {
            "use_dora": bool(raw.get("use_dora")),
            "bias": raw.get("bias", "none") not in (None, "none"),
            "modules_to_save": bool(raw.get("modules_to_save")),
            "rank_pattern": bool(raw.get("rank_pattern")),
            "alpha_pattern": bool(raw.get("alpha_pattern")),
            "fan_in_fan_out": bool(raw.get("fan_in_fan_out")),
            "layers_to_transform": raw.get("layers_to_transform") is not None,
        }
        for name, bad in refused.items():
            if bad:
                raise ValueError(
                    f"{where}: adapter_config {name}={raw.get(name)!r} is not supported"
                )
        peft_type = raw.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"{where}: peft_type {peft_type!r} is not LORA")
        targets = raw.get("target_modules") or ()
        if isinstance(targets, str):
            raise ValueError(
                f"{where}: target_modules as a pattern ({targets!r}) is not supported; "
                f"list the modules ({', '.join(TARGETS)})"
            )
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            raise ValueError(
                f"{where}: target_modules {unknown} are not supported (only {', '.join(TARGETS)})"
            )
        r = raw.get("r")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"{where}: r must be a positive integer, got {r!r}")
        return cls(
            r=r,
            lora_alpha=float(raw.get("lora_alpha", 8)),
            target_modules=tuple(t for t in TARGETS if t in targets),
            use_rslora=bool(raw.get("use_rslora", False)),
        )


@dataclass(kw_only=True)
class LoraAdapter:
    """One adapter's weights on the host (see the module docstring for what holds)."""

    name: str
    path: str
    config: LoraConfig
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.config.r

    @property
    def scaling(self) -> float:
        return self.config.scaling

    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def module_shapes(hf_config: Any) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of each target projection of a Llama-layout model (tensor parallelism 1)."""
    hidden = hf_config.hidden_size
    head_dim = getattr(hf_config, "head_dim", None) or hidden // hf_config.num_attention_heads
    q = hf_config.num_attention_heads * head_dim
    kv = hf_config.num_key_value_heads * head_dim
    inter = hf_config.intermediate_size
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def load_adapter(name: str, path: str | Path, hf_config: Any) -> LoraAdapter:
    """Read and check the PEFT adapter at ``path`` for a base model with ``hf_config``."""
    from safetensors.torch import load_file

    where = f"lora adapter {name!r} ({path})"
    root = Path(path)
    cfg_file, weights_file = root / "adapter_config.json", root / "adapter_model.safetensors"
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise ValueError(f"{where}: {f.name} not found")
    config = LoraConfig.from_dict(json.loads(cfg_file.read_text()), where)
    shapes = module_shapes(hf_config)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        m = _KEY.search(key)
        if m is None:
            raise ValueError(f"{where}: weight {key!r} is not a LoRA A/B of a supported module")
        layer, module, half = int(m.group(1)), m.group(2), m.group(3)
        if module not in config.target_modules:
            raise ValueError(f"{where}: weight {key!r} is for a module not in target_modules")
        if not 0 <= layer < hf_config.num_hidden_layers:
            raise ValueError(f"{where}: weight {key!r} names layer {layer} the model lacks")
        halves.setdefault((layer, module), {})[half] = tensor.float().contiguous()
    adapter = LoraAdapter(name=name, path=str(path), config=config)
    for (layer, module), ab in sorted(halves.items()):
        a, b = ab.get("A"), ab.get("B")
        n_in, n_out = shapes[module]
        if a is None or b is None:
            raise ValueError(f"{where}: layer {layer} {module} lacks lora_A or lora_B")
        if tuple(a.shape) != (config.r, n_in) or tuple(b.shape) != (n_out, config.r):
            raise ValueError(
                f"{where}: layer {layer} {module} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                f"the base model needs A ({config.r}, {n_in}), B ({n_out}, {config.r})"
            )
        adapter.weights[(layer, module)] = (a, b)
    if not adapter.weights:
        raise ValueError(f"{where}: adapter_model.safetensors holds no LoRA weights")
    return adapter


def parse_lora_paths(items: list[str] | dict[str, str] | None) -> dict[str, str]:
    """``["name=path", ...]`` (SGLang's form; a bare path is named by itself) or a dict ->
    ``{name: path}``. ValueError names ``lora_paths`` for a duplicate or empty name."""
    if not items:
        return {}
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            if not isinstance(item, str) or not item:
                raise ValueError(f"lora_paths entries must be 'name=path' strings, got {item!r}")
            name, sep, path = item.partition("=")
            pairs.append((name, path) if sep else (item, item))
    out: dict[str, str] = {}
    for name, path in pairs:
        if not name or not path:
            raise ValueError(f"lora_paths: empty name or path in {name!r}={path!r}")
        if name in out:
            raise ValueError(f"lora_paths: adapter name {name!r} given twice")
        out[name] = path
    return out
