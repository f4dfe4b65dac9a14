"""The ``lora8`` preset's engine: random rank-8 PEFT adapters on every projection of the
benchmarked model (made once with peft into a temporary directory), loaded into one engine,
and the batch's prompts spread over them round robin (prompt i on adapter i mod n)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_dir: str, count: int, rank: int, seed: int = 0) -> dict[str, str]:
    """``count`` random adapters of ``rank`` for the model at ``model_dir``: ``{name: dir}``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = Path(tempfile.mkdtemp(prefix="plait-lora-bench-"))
    out = {}
    for i in range(count):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False
        )
        model = get_peft_model(base, config)
        torch.manual_seed(seed + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        model.save_pretrained(root / f"a{i}")
        out[f"a{i}"] = str(root / f"a{i}")
    return out


class RoundRobinAdapters:
    """An engine whose ``generate`` puts prompt i of each call on adapter ``i mod n``."""

    def __init__(self, engine: Any, names: list[str]):
        self.engine = engine
        self.names = names

    def generate(self, *, input_ids: list[list[int]], sampling_params: Any, **kw: Any) -> Any:
        lora = [self.names[i % len(self.names)] for i in range(len(input_ids))]
        return self.engine.generate(
            input_ids=input_ids, sampling_params=sampling_params, lora_path=lora, **kw
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def build(model_path: str | None, count: int, rank: int, **engine_args: Any) -> Any:
    import plait
    from plait.models.default import default_model_path

    model_dir = str(model_path or default_model_path())
    adapters = make_adapters(model_dir, count, rank)
    engine = plait.Engine(
        model_path=model_path,
        lora_paths=[f"{n}={p}" for n, p in adapters.items()],
        max_loras_per_batch=count,
        **engine_args,
    )
    return RoundRobinAdapters(engine, list(adapters))
