"""A tiny random Llama, random-initialised PEFT adapters on it, and the oracle: transformers +
peft greedy output per adapter (float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import hf_greedy

#: name -> (rank, target modules, use_rslora)
ADAPTERS = {
    "qv4": (4, ["q_proj", "v_proj"], False),
    "all8": (
        8,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        True,
    ),
    "mlp6": (6, ["o_proj", "gate_proj", "up_proj", "down_proj"], False),
}
SHARED = [1, 5, 7, 9, 300, 400, 500, 600, 700, 800, 900, 1000, 1100]
PROMPTS = [SHARED + [11, 12, 13], SHARED + [21], [1, 22, 33, 44, 55], list(range(100, 140))]
NEW = 10
GREEDY = {"max_new_tokens": NEW, "temperature": 0}


def make_adapter(base_dir: Path, out: Path, rank: int, targets: list[str], rslora: bool, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, use_rslora=rslora,
        init_lora_weights=False,
    )  # fmt: skip
    model = get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():  # deltas as large as the base's own terms: every adapter shows
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_setup(make_tiny_model, tmp_path_factory):
    """(base dir, {name: adapter dir}, {name or None: expected outputs per PROMPTS})."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = make_tiny_model("llama")
    root = tmp_path_factory.mktemp("adapters")
    dirs = {
        name: make_adapter(base_dir, root / name, r, t, rs, seed)
        for seed, (name, (r, t, rs)) in enumerate(ADAPTERS.items())
    }
    expected: dict = {}
    for name in [None, *dirs]:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        if name is not None:
            model = PeftModel.from_pretrained(model, dirs[name]).eval()
        expected[name] = hf_greedy(model, PROMPTS, NEW)
    return base_dir, dirs, expected


def lora_paths(dirs: dict) -> list[str]:
    return [f"{n}={p}" for n, p in dirs.items()]
