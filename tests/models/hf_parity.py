"""Token parity with transformers on a tiny random checkpoint: the helper every
architecture's parity test uses (``tests/models/test_<arch>_parity.py``).

The oracle is transformers' float32 greedy ``generate``, one prompt at a time, EOS ignored.
Plait must give the same tokens for all prompts in one ragged batch with chunked prefill,
and again when the same prompts are served from the prefix cache (the second run's
``cached_tokens`` are checked, so a cache that never hits cannot pass).

Usage::

    path = build_tiny(tmp_path, "qwen3", smollm_dir, head_dim=32)
    want = hf_tokens(path)
    assert_engine_matches(path, want)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

import plait
from tests.conftest import TINY_BASE

#: a tiny dense config's shared fields (SmolLM2's vocabulary, so its tokenizer and chat
#: template serve the checkpoint); an architecture's test overrides what it needs
TINY = TINY_BASE
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SHARED = list(range(300, 336))  # a 36-token prefix two prompts share: the cache hit
PROMPTS = [
    SHARED + [7, 8, 9],
    [5, 17, 300, 4000, 41],
    SHARED + list(range(2000, 2013)),
    list(range(1000, 1021)),
]
#: the same shapes (a shared 36-token prefix, ragged lengths) with every id below 512, for
#: checkpoints with a 512-token vocabulary: a GGUF file's tokenizer metadata (tokens, types,
#: merges) is parsed by gguf-py at every read, seconds per read for 4096 tokens
SMALL_VOCAB = 512
PROMPTS_SMALL_VOCAB = [
    SHARED + [7, 8, 9],
    [5, 17, 300, 400, 41],
    SHARED + list(range(200, 213)),
    list(range(100, 121)),
]
NEW = 16
GREEDY = {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}


def build_tiny(
    path: Path,
    model_type: str,
    tokenizer_dir: Path | None = None,
    *,
    seed: int = 0,
    std: float = 0.15,
    **config: Any,
) -> Path:
    """Write a random ``model_type`` checkpoint (:data:`TINY` overridden by ``config``) with
    ``tokenizer_dir``'s tokenizer and chat template to ``path``. Matrices are drawn with
    ``std`` (far larger than init's 0.02, so logits are far from ties) and norm weights are
    perturbed, so a norm applied wrongly (``w`` for ``1 + w``) changes the tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**TINY, **config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, std)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:  # biases
                p.normal_(0, 0.05)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy(Path(tokenizer_dir) / name, path / name)
    return path


def hf_tokens(
    path: Path, prompts: list[list[int]] = PROMPTS, new: int = NEW, **config_overrides: Any
) -> list[list[int]]:
    """transformers' float32 greedy tokens, one prompt at a time, EOS ignored (the oracle);
    ``config_overrides`` go to ``from_pretrained`` (e.g. a window removed, to show it
    matters)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, **config_overrides
    ).eval()
    model.generation_config.eos_token_id = None
    outs = []
    for ids in prompts:
        with torch.no_grad():
            g = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        outs.append(g[0, len(ids) :].tolist())
    return outs


def engine_tokens(
    engine: plait.Engine, prompts: list[list[int]] = PROMPTS, new: int = NEW
) -> list[list[int]]:
    """One ragged batch, then the same prompts again, which must hit the prefix cache and
    give the same tokens; returns the first run's."""
    params = {**GREEDY, "max_new_tokens": new}
    first = engine.generate(input_ids=prompts, sampling_params=params)
    again = engine.generate(input_ids=prompts, sampling_params=params)
    got = [o["output_ids"] for o in first]
    assert [o["output_ids"] for o in again] == got, "a prefix-cache hit changed the tokens"
    hits = [o["meta_info"]["cached_tokens"] for o in again]
    assert all(h > 0 for h, p in zip(hits, prompts) if len(p) > 8), hits
    return got


def assert_engine_matches(
    path: Path,
    want: list[list[int]],
    prompts: list[list[int]] = PROMPTS,
    new: int = NEW,
    chunk: int | None = 16,
    **engine_kwargs: Any,
) -> plait.Engine:
    """Plait's tokens for ``prompts`` (batched, prefilled ``chunk`` tokens at a time, then
    from the prefix cache) equal ``want``; returns the (closed) engine for further checks."""
    kwargs: dict[str, Any] = {"max_total_tokens": 4096, **engine_kwargs}
    if chunk is not None:
        kwargs["chunked_prefill_size"] = chunk
    with plait.Engine(str(path), **kwargs) as engine:
        got = engine_tokens(engine, prompts, new)
    assert got == want
    return engine
