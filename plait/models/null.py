"""The null model: a forward pass that costs nothing, so what remains of a step is the engine's
own host path (scheduling, batch building, KV bookkeeping, sampling, output processing,
detokenization, streaming). ``benchmarks/host_path.py`` times it.

It registers through the model hook like any architecture (``PlaitNullForCausalLM``) and loads
from a directory :func:`make_null_checkpoint` writes: a config with one tiny layer (the KV pool
the engine sizes from it is real, and so is its bookkeeping) and a real tokenizer, so
detokenization costs what it costs with a real model.

Its tokens are a fixed function of the input: after token ``t`` comes ``(t * 31 + 7) % V``,
above the special tokens, so generation never stops early on EOS and any two runs agree. A
greedy-only batch gets :class:`~plait.core.forward_batch.GreedyTokens` computed on the host
from the input ids (what the CPU backend's fused greedy head returns: no logits at all);
otherwise logits are a preallocated one-hot matrix per batch size, so the sampler does its full
work over the vocabulary while the model spends nothing producing it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from plait.core.forward_batch import ForwardBatch, GreedyTokens

if TYPE_CHECKING:
    from plait.core.backend_api import AttentionBackend, ModelSpec
    from plait.quant.modules import QuantizedMatmul

ARCHITECTURE = "PlaitNullForCausalLM"
#: token ids below this are left alone (SmolLM2's specials live at the bottom of the vocab)
FIRST_ORDINARY_TOKEN = 64


def next_token(token: int, vocab_size: int) -> int:
    """The token the null model always predicts after ``token``."""
    span = vocab_size - FIRST_ORDINARY_TOKEN
    return FIRST_ORDINARY_TOKEN + (token * 31 + 7) % span


class _Heads(nn.Module):
    """What the runner reads of a model's first layer: its attention head counts."""

    def __init__(self, num_heads: int, num_kv_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads


class _Layer(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.self_attn = _Heads(config.num_attention_heads, config.num_key_value_heads)


class NullForCausalLM(nn.Module):
    """``forward(batch, attn)`` with no compute: see the module docstring."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.layers = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))
        self.sliding_windows: tuple[int | None, ...] = ()
        table = torch.tensor([next_token(t, self.vocab_size) for t in range(self.vocab_size)])
        self.register_buffer("next_ids", table, persistent=False)
        self._logits: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor | GreedyTokens:
        last_ids = batch.input_ids[batch.logits_rows]
        if batch.greedy_only:
            return GreedyTokens(tokens=self.next_ids[last_ids].tolist())
        rows = int(last_ids.shape[0])
        logits = self._logits.get(rows)
        if logits is None:
            logits = torch.zeros(rows, self.vocab_size)
            self._logits[rows] = logits
        else:
            logits.zero_()
        logits.scatter_(1, self.next_ids[last_ids].unsqueeze(1), 100.0)  # any temperature picks it
        return logits


def load_null(spec: ModelSpec, device: torch.device, matmul: QuantizedMatmul | None) -> nn.Module:
    """The :class:`~plait.core.backend_api.ModelLoader` of ``PlaitNullForCausalLM``."""
    if matmul is not None:
        raise ValueError(f"{ARCHITECTURE} has no Linear layers to quantize")
    if spec.tp.size > 1:
        raise ValueError(f"{ARCHITECTURE} runs on one rank (tp_size=1)")
    return NullForCausalLM(spec.hf_config).to(device)


def make_null_checkpoint(target: Path, tokenizer_dir: Path, context_len: int = 4096) -> Path:
    """Write a null-model directory at ``target``: one tiny layer in the config (the engine's
    KV pool stays small) and ``tokenizer_dir``'s tokenizer files, vocabulary and chat
    template. Returns ``target``."""
    from transformers import AutoTokenizer

    target.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(target)
    for extra in ("generation_config.json",):
        if (Path(tokenizer_dir) / extra).exists():
            shutil.copy(Path(tokenizer_dir) / extra, target / extra)
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "max_position_embeddings": context_len,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": "float32",
    }
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target
