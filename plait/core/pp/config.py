"""Which engine options pipeline parallelism (``pp_size > 1``) runs with, refused by name
before any rank starts. Each refusal is a path that would read or write KV, weights or
logits outside rank 0's stage, which no other stage would see."""

from __future__ import annotations

from typing import Any


def check_pipeline(cfg: Any) -> None:
    """ValueError naming the option ``cfg`` (an ``EngineConfig``) cannot combine with
    ``pp_size > 1``."""
    n = cfg.pp_size
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"pp_size must be a positive integer, got {n!r}")
    if n == 1:
        return
    head = f"pp_size={n} (--pp {n})"
    if cfg.tp_size != 1:
        raise ValueError(
            f"{head} with tp_size={cfg.tp_size} (--tp): pipeline and tensor parallelism "
            "do not combine yet; use one of them"
        )
    if cfg.disaggregation_mode != "null":
        raise ValueError(
            f"{head} with disaggregation_mode={cfg.disaggregation_mode!r}: prefill/decode "
            "disaggregation does not support pipeline parallelism (the KV lives in the "
            "stage processes, out of the transfer's reach)"
        )
    if cfg.lora_enabled:
        raise ValueError(
            f"{head} with lora_paths: LoRA adapters do not support pipeline parallelism"
        )
    if cfg.speculative_algorithm is not None:
        raise ValueError(
            f"{head} with speculative_algorithm: speculative decoding does not support "
            "pipeline parallelism"
        )
    quantized = cfg.quantization not in (None, "none") or str(cfg.model_path or "").endswith(
        ".gguf"
    )
    if quantized:
        raise ValueError(
            f"{head} with quantization={cfg.quantization or 'gguf'!r}: quantized models do "
            "not support pipeline parallelism"
        )
    if cfg.enable_graph_capture:
        raise ValueError(
            f"{head} with enable_graph_capture (--enable-graph-capture): pipeline stages "
            "run their layers eagerly"
        )


def check_loader(loader: Any, architecture: str, pp_size: int) -> None:
    """ValueError unless the model's loader can build one pipeline stage (its
    ``supports_pipeline_parallel`` attribute; Plait's Llama-family loader has it)."""
    if pp_size > 1 and not getattr(loader, "supports_pipeline_parallel", False):
        raise ValueError(
            f"pp_size={pp_size} (--pp {pp_size}): model architecture {architecture!r} does "
            "not support pipeline parallelism (Llama-family models only)"
        )
