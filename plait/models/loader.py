"""Load a Llama-family checkpoint into Plait's model: a directory (config.json + safetensors +
tokenizer) or a single GGUF file, which is converted once to a safetensors directory because
transformers' GGUF dequantization takes tens of seconds and the safetensors load takes one."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from plait.models.llama import SUPPORTED_MODEL_TYPES, LlamaForCausalLM
from plait.quant import QuantConfig
from plait.quant.modules import QuantizedMatmul

CACHE_ENV = "PLAIT_CACHE_DIR"
GGUF_SOURCE = "gguf_source.txt"  # in a converted directory: the path of its GGUF file


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "plait")) / "models"


def resolve_model_dir(model_path: str | os.PathLike) -> Path:
    """A directory to load from: the path itself, or the converted cache of a ``.gguf`` file."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model_path {str(path)!r} has no config.json")
        return path
    if path.suffix == ".gguf" and path.is_file():
        target = cache_dir() / path.stem
        if not (target / "config.json").exists():
            convert_gguf(path, target)
        record_gguf_source(target, path)
        return target
    raise ValueError(f"model_path {str(path)!r} is neither a model directory nor a .gguf file")


def record_gguf_source(model_dir: Path, gguf_file: Path) -> None:
    """Note in a converted directory which GGUF file it came from, so ``quantization='gguf'``
    can run that file's blocks when given the directory (the server resolves paths first)."""
    marker = model_dir / GGUF_SOURCE
    source = str(Path(gguf_file).resolve())
    if not marker.exists() or marker.read_text() != source:
        marker.write_text(source)


def gguf_source(model_dir: Path) -> Path | None:
    """The GGUF file ``model_dir`` was converted from, when it was and the file still exists."""
    marker = Path(model_dir) / GGUF_SOURCE
    if not marker.exists():
        return None
    source = Path(marker.read_text())
    return source if source.is_file() else None


def convert_gguf(gguf_file: Path, target: Path) -> None:
    """Dequantize a GGUF file through transformers and write config, safetensors and tokenizer.

    Written to a temporary sibling and renamed, so a crash never leaves a half cache behind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    tmp.chmod(0o755)
    try:
        kwargs = {"gguf_file": gguf_file.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32,
                                                     **kwargs)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        record_gguf_source(tmp, gguf_file)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {config.model_type!r} is not supported; "
                         f"supported: {sorted(SUPPORTED_MODEL_TYPES)}")
    return config


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_model(model_dir: Path, config: Any, dtype: torch.dtype, device: torch.device,
               max_positions: int, quant: QuantConfig = QuantConfig(),
               matmul: QuantizedMatmul | None = None) -> LlamaForCausalLM:
    """The model on ``device`` in ``dtype``. With ``quant.method != "none"`` its Linear layers
    are :class:`~plait.quant.modules.QuantizedLinear` calling ``matmul`` (the backend's
    ``quantized_linear``): ``gguf`` reads ``quant.gguf_file``'s blocks, ``int8``/``int4``
    quantize the checkpoint's decoder layers after loading it."""
    if quant.method != "none" and matmul is None:
        raise ValueError(f"quantization={quant.method!r} needs the backend's quantized matmul")
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions)
    model = model.to_empty(device=device)
    # to_empty leaves buffers uninitialised: rebuild the rotary tables on the real device.
    from plait.models.llama import RotaryEmbedding, head_dim_of
    rotary = RotaryEmbedding(config, head_dim_of(config), max_positions).to(device)
    for layer in model.layers:
        layer.self_attn.rotary = rotary
    if quant.method == "gguf":
        from plait.quant.gguf import load_gguf_weights
        model = model.to(dtype).eval()
        load_gguf_weights(model, quant.gguf_file, config, dtype, matmul)
    else:
        _load_weights(model, model_dir, config)
        if getattr(config, "tie_word_embeddings", False):
            model.lm_head.weight = model.embed_tokens.weight
        model = model.to(dtype).eval()
        if quant.method in ("int8", "int4"):
            from plait.quant.modules import quantize_linears
            quantize_linears(model, quant.method, matmul, quant.group_size, quant.symmetric)
    if device.type == "cpu":
        _store_linear_weights_column_major(model)
    return model


def _store_linear_weights_column_major(model: torch.nn.Module) -> None:
    """Keep each Linear's [out, in] weight as a transposed view of an [in, out] buffer.

    Same values, same module API; but MKL's fp32 matrix-vector product reads the column-major
    layout about 1.6x faster on the CPUs we measured (batch-1 decode is that product, 30 layers
    deep). The tied lm_head gets its own copy, so the embedding lookup keeps its row layout.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight = torch.nn.Parameter(module.weight.detach().t().contiguous().t(),
                                                   requires_grad=False)


# HF parameter name suffix -> (Plait parameter, shard index among the fused pieces)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def _load_weights(model: LlamaForCausalLM, model_dir: Path, config: Any) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {str(model_dir)!r}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                target, offset = _map_name(name, model)
                if target is None:
                    continue
                tensor = f.get_tensor(name)
                param = params[target]
                with torch.no_grad():
                    param[offset:offset + tensor.shape[0]].copy_(tensor)
                loaded.add(target)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(params) - loaded - tied
    if missing:
        raise ValueError(f"checkpoint in {str(model_dir)!r} lacks weights: {sorted(missing)[:5]}")


def _map_name(name: str, model: LlamaForCausalLM) -> tuple[str | None, int]:
    """Map an HF tensor name to (Plait parameter name, row offset inside a fused weight)."""
    if name.startswith("model."):
        name = name[len("model."):]
    if "rotary_emb" in name:
        return None, 0
    for hf, (ours, shard) in _FUSED.items():
        if f".{hf}." in name:
            layer = int(name.split(".")[1])
            attn = model.layers[layer].self_attn
            sizes = attn.split if hf.startswith("self_attn") else (model.layers[layer].mlp.inter,) * 2
            return name.replace(hf, ours), sum(sizes[:shard])
    return name, 0
