"""Load a Llama-family checkpoint into Plait's model: a directory (config.json + safetensors +
tokenizer) or a single GGUF file, which is converted once to a safetensors directory because
transformers' GGUF dequantization takes tens of seconds and the safetensors load takes one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file

from plait.core.pp.stage import PPStage
from plait.core.tp.group import TPGroup
from plait.models.checkpoint_files import checkpoint_entries
from plait.models.llama import LlamaForCausalLM
from plait.models.pp_stage import keep_stage, stage_name
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
    """Dequantize a GGUF file through transformers and write config, safetensors and tokenizer;
    a mixture-of-experts file gets Plait's own config and no weights
    (:mod:`plait.models.moe_gguf`: its loader reads the file itself).

    Written to a temporary sibling and renamed, so a crash never leaves a half cache behind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    tmp.chmod(0o755)
    try:
        from gguf import GGUFReader

        from plait.models.moe_gguf import convert_moe_gguf, is_moe_gguf

        reader = GGUFReader(str(gguf_file))
        if is_moe_gguf(reader):  # transformers cannot describe these: Plait's own reading
            convert_moe_gguf(reader, gguf_file, tmp)
            _commit(tmp, target, gguf_file)
            return
        kwargs = {"gguf_file": gguf_file.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, dtype=torch.float32, **kwargs
        )
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        _commit(tmp, target, gguf_file)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _commit(tmp: Path, target: Path, gguf_file: Path) -> None:
    """Record the source file and move the finished conversion into place."""
    record_gguf_source(tmp, gguf_file)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def load_config(model_dir: Path) -> Any:
    """The checkpoint's ``transformers`` config. Whether its architecture is supported is
    the model registry's answer (``plait.models.registry.loader_for``)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_model(
    model_dir: Path,
    config: Any,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    tp: TPGroup = TPGroup(),
    quant: QuantConfig = QuantConfig(),
    matmul: QuantizedMatmul | None = None,
    *,
    model_cls: type[LlamaForCausalLM] = LlamaForCausalLM,
    pp: PPStage = PPStage(),
) -> LlamaForCausalLM:
    """The model (``tp``'s shard of it) with its weights, built on the meta device first so
    only the kept shard is ever allocated. ``model_cls``: a subclass with the same parameter
    names (a plugin's variant of the architecture, ``docs/writing-a-model.md``). With ``quant.method != "none"`` its Linear layers
    are :class:`~plait.quant.modules.QuantizedLinear` calling ``matmul`` (the backend's
    ``quantized_linear``): ``gguf`` reads ``quant.gguf_file``'s blocks, ``int8``/``int4``
    quantize the checkpoint's decoder layers after loading it."""
    if quant.method != "none" and matmul is None:
        raise ValueError(f"quantization={quant.method!r} needs the backend's quantized matmul")
    if quant.method != "none" and tp.size > 1:
        raise ValueError(f"quantization={quant.method!r} does not support tp_size > 1 yet")
    with torch.device("meta"):
        model = model_cls(config, max_positions, tp)
    if pp.partial:  # on meta: the layers other stages hold are never allocated
        keep_stage(model, pp)
    model = model.to_empty(device=device)
    # to_empty leaves buffers uninitialised: rebuild the rotary tables on the real device.
    model.reset_rotary(device)
    if quant.method == "gguf":
        from plait.quant.gguf import load_gguf_weights

        model = model.to(dtype).eval()
        load_gguf_weights(model, quant.gguf_file, config, dtype, matmul)
    else:
        _load_weights(model, model_dir, config)
        if getattr(config, "tie_word_embeddings", False) and not pp.partial:
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
                module.weight = torch.nn.Parameter(
                    module.weight.detach().t().contiguous().t(), requires_grad=False
                )


# HF projection -> (Plait fused parameter, piece index, how the rank's slice is chosen)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0, "q_heads"),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1, "kv_heads"),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2, "kv_heads"),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0, "inter"),
    "mlp.up_proj": ("mlp.gate_up_proj", 1, "inter"),
}
# row-parallel weights: the rank's slice is along the input dimension (dim 1); biases are whole
_ROW_PARALLEL = {"self_attn.o_proj": "q_heads", "mlp.down_proj": "inter"}


@dataclass(frozen=True)
class _Target:
    """Where (a slice of) one checkpoint tensor goes: rows ``offset..`` of ``param`` receive
    the checkpoint tensor's ``[start, stop)`` along ``dim`` (``dim`` None: the whole tensor)."""

    param: str
    offset: int = 0
    dim: int | None = None
    start: int = 0
    stop: int = 0


def _load_weights(model: LlamaForCausalLM, model_dir: Path, config: Any) -> None:
    """Copy each rank's shard straight from the files: ``get_slice`` reads only the rows or
    columns this rank owns, so no rank ever holds a full weight it does not keep."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    stage: PPStage | None = getattr(model, "pp_stage", None)
    tie = getattr(config, "tie_word_embeddings", False)
    for name, f in checkpoint_entries(model_dir):
        local = name if stage is None else stage_name(name, stage, tie)
        if local is None:  # another pipeline stage's tensor
            continue
        targets = _fused_in_checkpoint(local, model, config)
        if targets is None:
            one = _map_name(local, model)
            targets = [] if one is None else [one]
        for target in targets:
            part = f.get_slice(name)
            if target.dim is None:
                tensor = part[:]
            elif target.dim == 0:
                tensor = part[target.start : target.stop]
            else:
                tensor = part[:, target.start : target.stop]
            param = params[target.param]
            with torch.no_grad():
                param[target.offset : target.offset + tensor.shape[0]].copy_(tensor)
            loaded.add(target.param)
    tied = {"lm_head.weight"} if tie and stage is None else set()
    missing = set(params) - loaded - tied
    if missing:
        raise ValueError(f"checkpoint in {str(model_dir)!r} lacks weights: {sorted(missing)[:5]}")


def _fused_in_checkpoint(name: str, model: LlamaForCausalLM, config: Any) -> list[_Target] | None:
    """Targets of a projection the checkpoint itself stores fused (Phi-3's ``qkv_proj`` and
    ``gate_up_proj``, rows ``[q | k | v]`` and ``[gate | up]``): this rank's rows of each
    piece, placed one after the other as Plait's fused layer holds them. None for any other
    tensor."""
    if name.startswith("model."):
        name = name[len("model.") :]
    fused = ".self_attn.qkv_proj." in name or ".mlp.gate_up_proj." in name
    if not name.startswith("layers.") or not fused:
        return None
    layer = model.layers[int(name.split(".")[1])]
    ranges = _shard_ranges(layer)
    if ".self_attn." in name:
        d = layer.self_attn.head_dim
        full = (config.num_attention_heads * d, config.num_key_value_heads * d)
        kinds = ("q_heads", "kv_heads", "kv_heads")
        bases = (0, full[0], full[0] + full[1])
    else:
        kinds = ("inter", "inter")
        bases = (0, config.intermediate_size)
    targets, offset = [], 0
    for kind, base in zip(kinds, bases):
        start, stop = ranges[kind]
        targets.append(_Target(name, offset, 0, base + start, base + stop))
        offset += stop - start
    return targets


def _map_name(name: str, model: LlamaForCausalLM) -> _Target | None:
    """Map an HF tensor name to its Plait parameter and this rank's slice of it."""
    if name.startswith("model."):
        name = name[len("model.") :]
    if "rotary_emb" in name:
        return None
    if name.startswith(("embed_tokens.", "lm_head.")):
        module = model.embed_tokens if name.startswith("embed_tokens.") else model.lm_head
        return _Target(name, 0, 0, module.vocab_start, module.vocab_stop)
    if not name.startswith("layers."):
        return _Target(name)
    layer = model.layers[int(name.split(".")[1])]
    ranges = _shard_ranges(layer)
    for hf, (ours, piece, kind) in _FUSED.items():
        if f".{hf}." in name:
            sizes = layer.self_attn.split if hf.startswith("self_attn") else (layer.mlp.inter,) * 2
            start, stop = ranges[kind]
            return _Target(name.replace(hf, ours), sum(sizes[:piece]), 0, start, stop)
    for hf, kind in _ROW_PARALLEL.items():
        if f".{hf}.weight" in name:
            return _Target(name, 0, 1, *ranges[kind])
    return _Target(name)


def _shard_ranges(layer: Any) -> dict[str, tuple[int, int]]:
    """The rank's rows of the q/k/v projections and its intermediate columns, in the full
    checkpoint's coordinates."""
    shard, d = layer.self_attn.shard, layer.self_attn.head_dim
    return {
        "q_heads": (shard.q_start * d, (shard.q_start + shard.num_heads) * d),
        "kv_heads": (shard.kv_start * d, (shard.kv_start + shard.num_kv_heads) * d),
        "inter": layer.mlp.inter_range,
    }
