"""The checkpoint kinds a peers comparison runs on, all built from the default SmolLM2 weights.

- ``q4``: the default checkpoint itself: float32, converted from the Q4_1 GGUF, so every layer
  weight sits on a 4-bit grid (Plait finds its lossless 4-bit form; llama.cpp reads the GGUF).
- ``fp32``: a genuinely float32 checkpoint: the default weights plus small Gaussian noise
  (``NOISE`` times each tensor's standard deviation, fixed seed), so no weight keeps the 4-bit
  grid or fits in bfloat16; same model in every other respect.
- ``bf16``: the ``fp32`` kind rounded to bfloat16 and saved as bfloat16, as checkpoints ship.

Built once into ``cache_dir/<kind>`` (safetensors and config rewritten, tokenizer files copied);
a ``.built`` stamp written last marks a finished one, so an interrupted build is redone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

KINDS = ("q4", "fp32", "bf16")
DTYPES = {"q4": "float32", "fp32": "float32", "bf16": "bfloat16"}  # as saved
NOISE = 1e-3  # relative to each tensor's std: far above float32's rounding, far below the model's
SEED = 0
STAMP = ".built"
WEIGHTS = "model.safetensors"


def parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"--kinds: unknown {unknown or 'empty list'}; choose from {KINDS}")
    return kinds


def checkpoint(kind: str, base: Path, cache_dir: Path) -> Path:
    """The directory holding ``kind``'s checkpoint (``base`` itself for ``q4``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; choose from {KINDS}")
    if kind == "q4":
        return base
    out = cache_dir / kind
    if (out / STAMP).exists():
        return out
    _build(kind, base, out)
    return out


def _build(kind: str, base: Path, out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    if not (base / WEIGHTS).exists():
        raise FileNotFoundError(f"{base} has no {WEIGHTS} to derive the {kind} checkpoint from")
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)
    tensors = load_file(str(base / WEIGHTS))
    for name in sorted(tensors):  # a fixed order: the same noise on every build
        t = tensors[name].to(torch.float32)
        if t.numel() > 1:
            t = t + torch.randn(t.shape, generator=gen) * (NOISE * float(t.std()))
        tensors[name] = t.to(torch.bfloat16 if kind == "bf16" else torch.float32).contiguous()
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    dtype = "bfloat16" if kind == "bf16" else "float32"
    config["dtype"] = config["torch_dtype"] = dtype  # transformers 5 and 4 spell it apart
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in base.iterdir():  # tokenizer, chat template, generation config; not the GGUF record
        if f.is_file() and f.name not in (WEIGHTS, "config.json", "gguf_source.txt", STAMP):
            shutil.copy2(f, out / f.name)
    (out / STAMP).write_text(f"{kind} from {base}, noise {NOISE}, seed {SEED}\n")
